/* Version, status strings, the per-thread detail message and deadline helpers. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <time.h>

#include "internal.h"

static _Thread_local char last_error[1024];

const char *cx_version(void) { return CX_VERSION_STRING; }

int cx_abi_version(void) { return CX_ABI_VERSION; }

const char *cx_status_string(cx_status status) {
    switch (status) {
    case CX_OK: return "ok";
    case CX_ERR_INVALID_ARG: return "invalid argument";
    case CX_ERR_OUT_OF_RANGE: return "out of range";
    case CX_ERR_NO_MEMORY: return "out of memory";
    case CX_ERR_UNSUPPORTED: return "not supported in this build (not built yet)";
    case CX_ERR_NOT_FOUND: return "not found";
    case CX_ERR_EXISTS: return "already registered";
    case CX_ERR_BUSY: return "busy: still has live registrations, peers or requests";
    case CX_ERR_TIMEOUT: return "timed out";
    case CX_ERR_CONNECTION: return "connection error";
    case CX_ERR_BACKEND: return "backend library error";
    case CX_ERR_INTERNAL: return "internal error";
    }
    return "unknown status";
}

const char *cx_last_error(void) { return last_error; }

cx_status cx_fail(cx_status status, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, args);
    va_end(args);
    return status;
}

cx_status cx_ok(void) {
    last_error[0] = '\0';
    return CX_OK;
}

int cx_backend_available(cx_backend backend) {
#ifdef CX_WITH_HCCL
    if (backend == CX_BACKEND_HCCL) {
        return cx_hccl_is_loaded();
    }
#endif
    return backend == CX_BACKEND_HOST_TCP || (backend == CX_BACKEND_NCCL && cx_nccl_is_loaded());
}

struct timespec cx_deadline(uint32_t timeout_ms) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += timeout_ms / 1000;
    ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    return ts;
}

int cx_cond_wait(pthread_cond_t *cv, pthread_mutex_t *mu, uint32_t timeout_ms,
                 const struct timespec *deadline) {
    if (timeout_ms == CX_TIMEOUT_INFINITE) {
        return pthread_cond_wait(cv, mu);
    }
    return pthread_cond_timedwait(cv, mu, deadline);
}
