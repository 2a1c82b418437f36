/* Private to the HCCL backend (backend_hccl.cc, hccl_status.cc, hccl_comm.cc, hccl_xfer.cc): the
 * resolved libhccl / libascendcl entry points, the communicator record and the shared helpers.
 *
 * Why C++: CANN's public hccl_types.h sizes its arrays with `const uint32_t` constants and
 * hccl.h names `HcclConfigValue` without a typedef; both are C++ only (a C compiler stops at
 * "variably modified 'internal' at file scope"). Every CANN consumer compiles them as C++, and
 * so does this backend: plain C-style C++ (no exceptions, no RTTI, no standard library), with the
 * cx_hccl_* entry points exported as C. Every type below comes from the real headers; each
 * function pointer has the type of the header's own prototype (decltype), so a signature change
 * in a CANN release is a compile error here, not a crash at run time.
 */
#ifndef CANN_EXT_HCCL_API_H
#define CANN_EXT_HCCL_API_H

#ifndef __cplusplus
#error "hccl_api.h is C++ (CANN's headers are C++ only); see the comment above"
#endif

#include <acl/acl.h>
#include <hccl/hccl.h>
#include <hccl/hccl_types.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "cann_ext.h"

extern "C" {
/* status.c: set the calling thread's detail and return `status` / clear it and return CX_OK. */
cx_status cx_fail(cx_status status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
cx_status cx_ok(void);
int cx_hccl_is_loaded(void);
}

/* The layout pd-serve relies on when it fills items (sends/receives of bytes); checked here
 * against the real header at compile time. */
static_assert(sizeof(HcclSendRecvItem) == 32 && offsetof(HcclSendRecvItem, buf) == 8 &&
                  offsetof(HcclSendRecvItem, count) == 16 &&
                  offsetof(HcclSendRecvItem, dataType) == 24 &&
                  offsetof(HcclSendRecvItem, remoteRank) == 28,
              "HcclSendRecvItem layout differs from the one documented for CANN 8.x");

struct hccl_api {
    /* libascendcl */
    decltype(&aclInit) acl_init;
    decltype(&aclrtSetDevice) set_device;
    decltype(&aclrtGetDevice) get_device;
    decltype(&aclrtGetDeviceCount) get_device_count;
    decltype(&aclrtCreateStream) create_stream;
    decltype(&aclrtDestroyStream) destroy_stream;
    decltype(&aclrtSynchronizeStream) sync_stream;
    decltype(&aclrtCreateEvent) create_event;
    decltype(&aclrtDestroyEvent) destroy_event;
    decltype(&aclrtRecordEvent) record_event;
    decltype(&aclrtQueryEventStatus) query_event;
    decltype(&aclrtStreamWaitEvent) stream_wait_event;
    decltype(&aclrtMalloc) malloc_device;
    decltype(&aclrtFree) free_device;
    decltype(&aclrtSynchronizeStreamWithTimeout) sync_stream_timeout; /* optional */
    decltype(&aclGetRecentErrMsg) recent_err_msg;                     /* optional */
    decltype(&aclrtDeviceGetUuid) device_uuid;                        /* optional */
    /* libhccl */
    decltype(&HcclGetRootInfo) get_root_info;
    decltype(&HcclCommInitRootInfo) comm_init_root_info;
    decltype(&HcclCommDestroy) comm_destroy;
    decltype(&HcclSend) send;
    decltype(&HcclRecv) recv;
    decltype(&HcclBatchSendRecv) batch_send_recv;
    decltype(&HcclGetErrorString) get_error_string;
    decltype(&HcclGetCommAsyncError) get_comm_async_error; /* optional */
};

/* Filled once by cx_hccl_load; read-only afterwards. */
extern hccl_api cx_hccl_api;

/* Where a communicator stands: HcclCommInitRootInfo blocks until every rank joined, so it runs
 * on a thread of its own and the caller polls. */
enum hccl_comm_state { HCCL_COMM_JOINING, HCCL_COMM_READY, HCCL_COMM_FAILED };

struct cx_hccl_comm {
    pthread_mutex_t mu;      /* guards state, abandoned, result, detail */
    hccl_comm_state state;
    bool abandoned;          /* destroyed while joining: the join thread frees everything */
    HcclResult result;       /* of HcclCommInitRootInfo */
    char detail[512];        /* the join thread's failure text (cx_last_error is per thread) */
    HcclComm comm;           /* valid once READY */
    HcclRootInfo root_info;  /* the copy the join thread reads */
    uint32_t nranks, rank;
    int32_t device;
};

/* Communicator management (init, destroy) is serialised per device: HCCL allows concurrent
 * inits from several threads only when each thread has a device of its own. */
pthread_mutex_t *cx_hccl_device_mutex(int32_t device);

/* Records HCCL's failure of `call` (code, our meaning, HcclGetErrorString and ACL's recent error
 * text) and returns the matching cx_status (the error-code map lives in hccl_status.cc). */
cx_status cx_hccl_fail(const char *call, HcclResult r);
/* The same text for an ACL runtime call that returned `err`. */
cx_status cx_acl_fail(const char *call, aclError err);
/* Writes the failure text of `call` into buf (for a thread whose cx_last_error nobody reads). */
void cx_hccl_describe(char *buf, size_t cap, const char *call, HcclResult r);
/* The cx_status an HcclResult maps to. */
cx_status cx_hccl_status(HcclResult r);
/* CX_ERR_UNSUPPORTED unless loaded (names `fn`). */
cx_status cx_hccl_require(const char *fn);
/* Makes `device` current on the calling thread (aclrtSetDevice only when it is not already). */
cx_status cx_hccl_use_device(int32_t device);

#endif /* CANN_EXT_HCCL_API_H */
