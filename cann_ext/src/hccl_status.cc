/* HCCL backend: HcclResult and aclError mapped to cx_status, with texts naming the call, HCCL's
 * code, what it means, HcclGetErrorString and ACL's most recent error message. The map is
 * documented in cann_ext.h. */
#include <stdio.h>

#include "hccl_api.h"

namespace {

const char *result_meaning(int r) {
    switch (r) {
    case HCCL_E_PARA: return "invalid parameter";
    case HCCL_E_PTR: return "null pointer";
    case HCCL_E_MEMORY: return "memory error";
    case HCCL_E_INTERNAL: return "internal HCCL error";
    case HCCL_E_NOT_SUPPORT: return "not supported";
    case HCCL_E_NOT_FOUND: return "resource not found";
    case HCCL_E_UNAVAIL: return "resource unavailable";
    case HCCL_E_SYSCALL: return "a system call failed";
    case HCCL_E_TIMEOUT: return "timed out (HCCL_CONNECT_TIMEOUT / HCCL_EXEC_TIMEOUT)";
    case HCCL_E_OPEN_FILE_FAILURE: return "cannot open a file";
    case HCCL_E_TCP_CONNECT: return "TCP connect to the root failed (check HCCL_IF_IP)";
    case HCCL_E_ROCE_CONNECT: return "RoCE connect failed (check the NPU network: hccn_tool)";
    case HCCL_E_TCP_TRANSFER: return "TCP transfer failed";
    case HCCL_E_ROCE_TRANSFER: return "RoCE transfer failed";
    case HCCL_E_RUNTIME: return "an ACL runtime call failed";
    case HCCL_E_DRV: return "a driver call failed";
    case HCCL_E_PROFILING: return "profiling failed";
    case HCCL_E_CCE: return "a device kernel (CCE) call failed";
    case HCCL_E_NETWORK: return "a network call failed";
    case HCCL_E_AGAIN: return "try again";
    case HCCL_E_REMOTE: return "the peer failed (error completion)";
    /* Numbered: CANN releases before 8.x lack these names. */
    case 22: return "the communicator is suspending";
    case 23: return "operation retry failed";
    case 24: return "out of device memory";
    default: return "unknown HcclResult";
    }
}

}  // namespace

cx_status cx_hccl_status(HcclResult r) {
    switch (static_cast<int>(r)) {
    case HCCL_E_PARA:
    case HCCL_E_PTR: return CX_ERR_INVALID_ARG;
    case HCCL_E_MEMORY:
    case 24: return CX_ERR_NO_MEMORY; /* HCCL_E_OOM */
    case HCCL_E_NOT_SUPPORT: return CX_ERR_UNSUPPORTED;
    case HCCL_E_NOT_FOUND: return CX_ERR_NOT_FOUND;
    case HCCL_E_TIMEOUT: return CX_ERR_TIMEOUT;
    case HCCL_E_TCP_CONNECT:
    case HCCL_E_ROCE_CONNECT:
    case HCCL_E_TCP_TRANSFER:
    case HCCL_E_ROCE_TRANSFER:
    case HCCL_E_NETWORK:
    case HCCL_E_REMOTE: return CX_ERR_CONNECTION;
    case HCCL_E_AGAIN:
    case 22: return CX_ERR_BUSY; /* HCCL_E_SUSPENDING */
    default: return CX_ERR_BACKEND;
    }
}

static const char *recent_acl_error(void) {
    const char *msg = cx_hccl_api.recent_err_msg != NULL ? cx_hccl_api.recent_err_msg() : NULL;
    return msg != NULL ? msg : "";
}

void cx_hccl_describe(char *buf, size_t cap, const char *call, HcclResult r) {
    const char *text = cx_hccl_api.get_error_string != NULL ? cx_hccl_api.get_error_string(r)
                                                            : NULL;
    const char *acl = recent_acl_error();
    snprintf(buf, cap, "%s failed: HcclResult %d, %s (%s)%s%s", call, static_cast<int>(r),
             result_meaning(r), text != NULL ? text : "no text",
             *acl ? "; recent ACL error: " : "", acl);
}

cx_status cx_hccl_fail(const char *call, HcclResult r) {
    char text[1000];
    cx_hccl_describe(text, sizeof text, call, r);
    return cx_fail(cx_hccl_status(r), "%s", text);
}

cx_status cx_acl_fail(const char *call, aclError err) {
    const char *acl = recent_acl_error();
    cx_status status = CX_ERR_BACKEND;
    if (err == ACL_ERROR_RT_STREAM_SYNC_TIMEOUT || err == ACL_ERROR_RT_EVENT_SYNC_TIMEOUT) {
        status = CX_ERR_TIMEOUT;
    } else if (err == ACL_ERROR_RT_MEMORY_ALLOCATION) {
        status = CX_ERR_NO_MEMORY;
    } else if (err == ACL_ERROR_RT_PARAM_INVALID || err == ACL_ERROR_RT_INVALID_DEVICEID) {
        status = CX_ERR_INVALID_ARG;
    }
    return cx_fail(status, "%s failed: aclError %d%s%s", call, err,
                   *acl ? "; recent ACL error: " : "", acl);
}
