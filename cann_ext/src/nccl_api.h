/* Private to backend_nccl.c and nccl_xfer.c: the resolved libnccl entry points and the helpers
 * both files use. `cx_nccl_api` is filled once by cx_nccl_load and read-only afterwards. */
#ifndef CANN_EXT_NCCL_API_H
#define CANN_EXT_NCCL_API_H

#include <stdbool.h>

#include "internal.h"
#include "nccl_abi.h"

typedef struct nccl_api {
    cxn_result (*get_version)(int *);
    cxn_result (*get_unique_id)(cxn_unique_id *);
    cxn_result (*comm_init_rank_config)(cxn_comm *, int, cxn_unique_id, int, cxn_config *);
    cxn_result (*comm_get_async_error)(cxn_comm, cxn_result *);
    cxn_result (*comm_finalize)(cxn_comm);
    cxn_result (*comm_destroy)(cxn_comm);
    cxn_result (*comm_abort)(cxn_comm);
    cxn_result (*group_start)(void);
    cxn_result (*group_end)(void);
    cxn_result (*send)(const void *, size_t, int, int, cxn_comm, void *);
    cxn_result (*recv)(void *, size_t, int, int, cxn_comm, void *);
    const char *(*get_error_string)(cxn_result);
    const char *(*get_last_error)(cxn_comm); /* optional (NCCL >= 2.13) */
} nccl_api;

extern nccl_api cx_nccl_api;

/* Records NCCL's failure of `call` (its code, meaning, ncclGetErrorString and ncclGetLastError
 * texts) and returns the matching cx_status. */
cx_status cx_nccl_fail(const char *call, cxn_result r, cxn_comm comm);
/* CX_ERR_UNSUPPORTED unless libnccl is loaded; CX_ERR_INVALID_ARG for a NULL comm when
 * need_comm. */
cx_status cx_nccl_require(const char *fn, const void *comm, bool need_comm);
/* Maps a call's result: ncclSuccess and ncclInProgress are fine (*in_progress says which, when
 * given); anything else fails through cx_nccl_fail. */
cx_status cx_nccl_finish(const char *call, cxn_result r, cxn_comm comm, int *in_progress);

#endif /* CANN_EXT_NCCL_API_H */
