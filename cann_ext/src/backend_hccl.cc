/* HCCL backend: libascendcl and libhccl loaded with dlopen() at run time, devices and root info.
 * Error codes are mapped in hccl_status.cc, communicators are in hccl_comm.cc, streams, events
 * and transfers in hccl_xfer.cc; the contract is in cann_ext.h.
 *
 * Lifecycle of the libraries (pd_serve/kv/hccl_lib.py drives it):
 *   1. cx_hccl_load opens libascendcl (an explicit path, else $PD_SERVE_ACL_LIB, else
 *      libascendcl.so on the loader's path) and libhccl (likewise with $PD_SERVE_HCCL_LIB and
 *      libhccl.so), resolves every symbol, then calls aclInit(NULL) (a framework that already
 *      initialised ACL answers ACL_ERROR_REPEAT_INITIALIZE, which is fine).
 *   2. Once loaded they stay loaded: ACL and HCCL start threads, so they are never dlclose()d.
 * Compiled as C++ because CANN's headers are C++ only (see hccl_api.h).
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hccl_api.h"

#define ACL_LIB_ENV "PD_SERVE_ACL_LIB"
#define HCCL_LIB_ENV "PD_SERVE_HCCL_LIB"

hccl_api cx_hccl_api; /* complete before `loaded` is set; never changes afterwards */
/* One per device id modulo the table size (two devices sharing a slot only serialise more). */
static pthread_mutex_t device_mu[64];
static pthread_once_t device_mu_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t load_mu = PTHREAD_MUTEX_INITIALIZER;
static bool loaded; /* guarded by load_mu */

namespace {

struct symbol {
    const char *name;
    void *slot; /* the address of a function-pointer member of hccl_api */
    bool required;
};

/* Copies dlsym results into function-pointer slots (memcpy: no cast between object and
 * function pointers). Returns the first missing required symbol, or NULL. */
const char *resolve(void *lib, const symbol *table, size_t n) {
    for (size_t i = 0; i < n; i++) {
        void *sym = dlsym(lib, table[i].name);
        if (sym == NULL && table[i].required) {
            return table[i].name;
        }
        memcpy(table[i].slot, &sym, sizeof sym);
    }
    return NULL;
}

const char *resolve_acl(void *lib, hccl_api *a) {
    const symbol table[] = {
        {"aclInit", &a->acl_init, true},
        {"aclrtSetDevice", &a->set_device, true},
        {"aclrtGetDevice", &a->get_device, true},
        {"aclrtGetDeviceCount", &a->get_device_count, true},
        {"aclrtCreateStream", &a->create_stream, true},
        {"aclrtDestroyStream", &a->destroy_stream, true},
        {"aclrtSynchronizeStream", &a->sync_stream, true},
        {"aclrtCreateEvent", &a->create_event, true},
        {"aclrtDestroyEvent", &a->destroy_event, true},
        {"aclrtRecordEvent", &a->record_event, true},
        {"aclrtQueryEventStatus", &a->query_event, true},
        {"aclrtStreamWaitEvent", &a->stream_wait_event, true},
        {"aclrtMalloc", &a->malloc_device, true},
        {"aclrtFree", &a->free_device, true},
        {"aclrtSynchronizeStreamWithTimeout", &a->sync_stream_timeout, false},
        {"aclGetRecentErrMsg", &a->recent_err_msg, false},
        {"aclrtDeviceGetUuid", &a->device_uuid, false},
    };
    return resolve(lib, table, sizeof table / sizeof table[0]);
}

const char *resolve_hccl(void *lib, hccl_api *a) {
    const symbol table[] = {
        {"HcclGetRootInfo", &a->get_root_info, true},
        {"HcclCommInitRootInfo", &a->comm_init_root_info, true},
        {"HcclCommDestroy", &a->comm_destroy, true},
        {"HcclSend", &a->send, true},
        {"HcclRecv", &a->recv, true},
        {"HcclBatchSendRecv", &a->batch_send_recv, true},
        {"HcclGetErrorString", &a->get_error_string, true},
        {"HcclGetCommAsyncError", &a->get_comm_async_error, false},
    };
    return resolve(lib, table, sizeof table / sizeof table[0]);
}

/* Appends "name (why); " to the list of candidates tried. */
void note(char *tried, size_t cap, const char *name, const char *why) {
    size_t used = strlen(tried);
    if (used + 1 < cap) {
        snprintf(tried + used, cap - used, "%s (%s); ", name, why ? why : "unknown error");
    }
}

typedef const char *(*resolver)(void *, hccl_api *);

/* Opens the first candidate that resolves; NULL with `tried` filled in otherwise. */
void *open_first(const char *path, const char *env_name, const char *soname, int flags,
                 resolver fn, hccl_api *api, char *tried, size_t cap) {
    const char *env = getenv(env_name);
    const char *candidates[2];
    size_t n = 0;
    if (path != NULL && *path != '\0') {
        candidates[n++] = path;
    }
    /* A path set on purpose never falls back to another copy. */
    candidates[n++] = (env != NULL && *env != '\0') ? env : soname;
    for (size_t i = 0; i < n; i++) {
        void *lib = dlopen(candidates[i], flags);
        if (lib == NULL) {
            note(tried, cap, candidates[i], dlerror());
            continue;
        }
        const char *missing = fn(lib, api);
        if (missing == NULL) {
            return lib;
        }
        char why[128];
        snprintf(why, sizeof why, "no symbol %s", missing);
        note(tried, cap, candidates[i], why);
        dlclose(lib); /* nothing of it was called */
    }
    size_t used = strlen(tried);
    if (used >= 2) {
        tried[used - 2] = '\0'; /* the last "; " */
    }
    return NULL;
}

cx_status load_locked(const char *acl_path, const char *hccl_path) {
    hccl_api found;
    memset(&found, 0, sizeof found);
    char tried[768] = "";
    /* RTLD_GLOBAL: libhccl's own reference to libascendcl binds to this copy. */
    void *acl = open_first(acl_path, ACL_LIB_ENV, "libascendcl.so", RTLD_NOW | RTLD_GLOBAL,
                           resolve_acl, &found, tried, sizeof tried);
    if (acl == NULL) {
        return cx_fail(CX_ERR_NOT_FOUND,
                       "cannot load libascendcl: tried %s. Install the CANN toolkit and source "
                       "its set_env.sh (it puts lib64 on LD_LIBRARY_PATH), or set " ACL_LIB_ENV
                       " to the library's path", tried);
    }
    void *hccl = open_first(hccl_path, HCCL_LIB_ENV, "libhccl.so", RTLD_NOW | RTLD_LOCAL,
                            resolve_hccl, &found, tried, sizeof tried);
    if (hccl == NULL) {
        dlclose(acl);
        return cx_fail(CX_ERR_NOT_FOUND,
                       "cannot load libhccl: tried %s. Install the CANN toolkit and source its "
                       "set_env.sh, or set " HCCL_LIB_ENV " to the library's path", tried);
    }
    aclError err = found.acl_init(NULL);
    if (err != ACL_SUCCESS && err != ACL_ERROR_REPEAT_INITIALIZE) {
        cx_hccl_api = found; /* for the error text only; `loaded` stays false */
        return cx_acl_fail("aclInit", err);
    }
    cx_hccl_api = found;
    loaded = true;
    return cx_ok();
}

}  // namespace

extern "C" {

int cx_hccl_is_loaded(void) {
    pthread_mutex_lock(&load_mu);
    bool yes = loaded;
    pthread_mutex_unlock(&load_mu);
    return yes;
}

cx_status cx_hccl_load(const char *acl_path, const char *hccl_path) {
    pthread_mutex_lock(&load_mu);
    cx_status st = loaded ? cx_ok() : load_locked(acl_path, hccl_path);
    pthread_mutex_unlock(&load_mu);
    return st;
}

}  // extern "C"

static void init_device_mu(void) {
    for (pthread_mutex_t &mu : device_mu) {
        pthread_mutex_init(&mu, NULL);
    }
}

pthread_mutex_t *cx_hccl_device_mutex(int32_t device) {
    pthread_once(&device_mu_once, init_device_mu);
    size_t n = sizeof device_mu / sizeof device_mu[0];
    return &device_mu[static_cast<size_t>(device < 0 ? -device : device) % n];
}

cx_status cx_hccl_require(const char *fn) {
    if (!cx_hccl_is_loaded()) {
        return cx_fail(CX_ERR_UNSUPPORTED,
                       "%s: libhccl is not loaded (call cx_hccl_load first)", fn);
    }
    return CX_OK;
}

cx_status cx_hccl_use_device(int32_t device) {
    int32_t current = -1;
    if (cx_hccl_api.get_device(&current) == ACL_SUCCESS && current == device) {
        return CX_OK;
    }
    aclError err = cx_hccl_api.set_device(device);
    return err == ACL_SUCCESS ? CX_OK : cx_acl_fail("aclrtSetDevice", err);
}

extern "C" {

cx_status cx_hccl_device_count(uint32_t *count) {
    cx_status st = cx_hccl_require("cx_hccl_device_count");
    if (st != CX_OK || count == NULL) {
        return st != CX_OK ? st : cx_fail(CX_ERR_INVALID_ARG, "cx_hccl_device_count: NULL out");
    }
    aclError err = cx_hccl_api.get_device_count(count);
    return err == ACL_SUCCESS ? cx_ok() : cx_acl_fail("aclrtGetDeviceCount", err);
}

cx_status cx_hccl_device_uuid(int32_t device, void *out, size_t cap, size_t *len) {
    cx_status st = cx_hccl_require("cx_hccl_device_uuid");
    if (st != CX_OK) {
        return st;
    }
    if (out == NULL || len == NULL || cap < sizeof(aclrtUuid)) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_hccl_device_uuid: need a %zu-byte buffer",
                       sizeof(aclrtUuid));
    }
    if (cx_hccl_api.device_uuid == NULL) {
        return cx_fail(CX_ERR_UNSUPPORTED, "this libascendcl has no aclrtDeviceGetUuid");
    }
    aclrtUuid uuid;
    aclError err = cx_hccl_api.device_uuid(device, &uuid);
    if (err != ACL_SUCCESS) {
        return cx_acl_fail("aclrtDeviceGetUuid", err);
    }
    memcpy(out, &uuid, sizeof uuid);
    *len = sizeof uuid;
    return cx_ok();
}

cx_status cx_hccl_get_root_info(int32_t device, void *out, size_t cap, size_t *len) {
    cx_status st = cx_hccl_require("cx_hccl_get_root_info");
    if (st != CX_OK) {
        return st;
    }
    if (out == NULL || len == NULL || cap < sizeof(HcclRootInfo)) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_hccl_get_root_info: need a %zu-byte buffer",
                       sizeof(HcclRootInfo));
    }
    /* The root info names this device: it must be current (HCCL's documented order). */
    st = cx_hccl_use_device(device);
    if (st != CX_OK) {
        return st;
    }
    HcclRootInfo info;
    HcclResult r = cx_hccl_api.get_root_info(&info);
    if (r != HCCL_SUCCESS) {
        return cx_hccl_fail("HcclGetRootInfo", r);
    }
    memcpy(out, &info, sizeof info);
    *len = sizeof info;
    return cx_ok();
}

}  // extern "C"
