/* The slice of NCCL's C ABI that backend_nccl.c calls, declared here so that the build needs
 * neither nccl.h nor CUDA headers (libnccl is dlopen()ed at run time).
 *
 * Everything below mirrors nccl.h and has been stable since NCCL 2.17: result codes, the
 * ncclUint8 data type, the 128-byte unique id and the leading fields of ncclConfig_t. The config
 * struct mirrors ncclConfig_v21700 up to `netName` (the fields NCCL 2.17 introduced), and we
 * declare `version` = NCCL_VERSION(2, 17, 0) and `size` = sizeof(cxn_config). NCCL's
 * parseCommConfig copies `size` bytes, checks `magic`, and keeps its own defaults for every field
 * past `size` or newer than `version`, so this prefix stays valid for later NCCL releases (the
 * struct is append-only by NCCL's rule). tests/gpu/test_nccl_transport.py compiles a check of
 * each item against the real nccl.h where one is installed.
 */
#ifndef CANN_EXT_NCCL_ABI_H
#define CANN_EXT_NCCL_ABI_H

#include <limits.h>
#include <stddef.h>

#define CXN_UNIQUE_ID_BYTES 128 /* NCCL_UNIQUE_ID_BYTES */

typedef struct cxn_unique_id {
    char internal[CXN_UNIQUE_ID_BYTES];
} cxn_unique_id; /* ncclUniqueId, passed by value */

typedef struct cxn_comm_s *cxn_comm; /* ncclComm_t: opaque pointer */
typedef int cxn_result;              /* ncclResult_t: an int-sized enum */

/* ncclResult_t values. */
#define CXN_SUCCESS 0
#define CXN_UNHANDLED_CUDA_ERROR 1
#define CXN_SYSTEM_ERROR 2
#define CXN_INTERNAL_ERROR 3
#define CXN_INVALID_ARGUMENT 4
#define CXN_INVALID_USAGE 5
#define CXN_REMOTE_ERROR 6
#define CXN_IN_PROGRESS 7
#define CXN_TIMEOUT 8 /* newer releases only; older ones never return it */

#define CXN_UINT8 1 /* ncclUint8: counts are bytes */

/* NCCL_VERSION(X, Y, Z) for Y > 8 (every release this file supports). */
#define CXN_VERSION(x, y, z) ((x) * 10000 + (y) * 100 + (z))
#define CXN_MIN_VERSION CXN_VERSION(2, 17, 0)
#define CXN_CONFIG_MAGIC 0xcafebeefu /* NCCL_API_MAGIC; earlier headers spell it out */
#define CXN_CONFIG_VERSION CXN_VERSION(2, 17, 0)
#define CXN_CONFIG_UNDEF_INT INT_MIN /* NCCL_CONFIG_UNDEF_INT: "let NCCL choose" */

/* The leading fields of ncclConfig_t (layout of ncclConfig_v21700 up to netName). */
typedef struct cxn_config {
    size_t size;
    unsigned int magic;
    unsigned int version;
    int blocking; /* 0: calls return ncclInProgress and finish in the background */
    int cgaClusterSize;
    int minCTAs;
    int maxCTAs;
    const char *netName;
} cxn_config;

#endif /* CANN_EXT_NCCL_ABI_H */
