/* Endpoint objects and memory registration bookkeeping; network entry points are stubs.
 *
 * Lifecycle of a registration:
 *   1. cx_mem_register records [addr, addr + length) under a fresh non-zero handle;
 *   2. transfers (once built) check their ranges against it;
 *   3. cx_mem_deregister forgets it; cx_endpoint_destroy refuses while any remain.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

typedef struct registration {
    cx_mem_handle handle;
    uintptr_t addr;
    uint64_t length;
    cx_mem_kind kind;
} registration;

struct cx_endpoint {
    cx_backend backend;
    int32_t device_id;
    uint32_t timeout_ms;
    registration *regs; /* live registrations, unordered */
    size_t num_regs;
    size_t cap_regs;
    cx_mem_handle next_handle;
};

cx_status cx_endpoint_create(const cx_endpoint_config *config, cx_endpoint **out) {
    if (config == NULL || out == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_endpoint_create: config and out must not be NULL");
    }
    *out = NULL;
    if (config->backend == CX_BACKEND_NCCL || config->backend == CX_BACKEND_HCCL) {
        return cx_fail(CX_ERR_UNSUPPORTED, "cx_endpoint_create: backend %d is not built yet",
                       (int)config->backend);
    }
    if (config->backend != CX_BACKEND_HOST_TCP) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_endpoint_create: unknown backend %d",
                       (int)config->backend);
    }
    cx_endpoint *ep = calloc(1, sizeof *ep);
    if (ep == NULL) {
        return cx_fail(CX_ERR_NO_MEMORY, "cx_endpoint_create: out of memory");
    }
    ep->backend = config->backend;
    ep->device_id = config->device_id;
    ep->timeout_ms = config->timeout_ms;
    ep->next_handle = 1;
    *out = ep;
    return cx_ok();
}

cx_status cx_endpoint_destroy(cx_endpoint *ep) {
    if (ep == NULL) {
        return cx_ok();
    }
    if (ep->num_regs > 0) {
        return cx_fail(CX_ERR_BUSY, "cx_endpoint_destroy: %zu registration(s) still live",
                       ep->num_regs);
    }
    free(ep->regs);
    free(ep);
    return cx_ok();
}

static int overlaps(const registration *r, uintptr_t addr, uint64_t length) {
    return addr < r->addr + r->length && r->addr < addr + length;
}

static cx_status check_new_range(const cx_endpoint *ep, void *addr, uint64_t length,
                                 cx_mem_kind kind) {
    if (addr == NULL || length == 0) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_mem_register: addr must not be NULL, length > 0");
    }
    if (kind != CX_MEM_HOST && kind != CX_MEM_DEVICE) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_mem_register: unknown memory kind %d", (int)kind);
    }
    if (kind == CX_MEM_DEVICE && ep->backend == CX_BACKEND_HOST_TCP) {
        return cx_fail(CX_ERR_UNSUPPORTED, "cx_mem_register: host TCP moves host memory only");
    }
    uintptr_t start = (uintptr_t)addr;
    if (length > UINTPTR_MAX - start) {
        return cx_fail(CX_ERR_OUT_OF_RANGE, "cx_mem_register: range wraps the address space");
    }
    for (size_t i = 0; i < ep->num_regs; i++) {
        if (overlaps(&ep->regs[i], start, length)) {
            return cx_fail(CX_ERR_EXISTS, "cx_mem_register: range overlaps registration %u",
                           ep->regs[i].handle);
        }
    }
    return CX_OK;
}

cx_status cx_mem_register(cx_endpoint *ep, void *addr, uint64_t length, cx_mem_kind kind,
                          cx_mem_handle *out) {
    if (ep == NULL || out == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_mem_register: ep and out must not be NULL");
    }
    cx_status st = check_new_range(ep, addr, length, kind);
    if (st != CX_OK) {
        return st;
    }
    if (ep->num_regs == ep->cap_regs) {
        size_t cap = ep->cap_regs == 0 ? 8 : ep->cap_regs * 2;
        registration *grown = realloc(ep->regs, cap * sizeof *grown);
        if (grown == NULL) {
            return cx_fail(CX_ERR_NO_MEMORY, "cx_mem_register: out of memory");
        }
        ep->regs = grown;
        ep->cap_regs = cap;
    }
    if (ep->next_handle == 0) {
        return cx_fail(CX_ERR_NO_MEMORY, "cx_mem_register: handle space exhausted");
    }
    registration *r = &ep->regs[ep->num_regs++];
    r->handle = ep->next_handle++;
    r->addr = (uintptr_t)addr;
    r->length = length;
    r->kind = kind;
    *out = r->handle;
    return cx_ok();
}

static registration *find(const cx_endpoint *ep, cx_mem_handle handle) {
    for (size_t i = 0; i < ep->num_regs; i++) {
        if (ep->regs[i].handle == handle) {
            return &ep->regs[i];
        }
    }
    return NULL;
}

cx_status cx_mem_deregister(cx_endpoint *ep, cx_mem_handle handle) {
    if (ep == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_mem_deregister: ep must not be NULL");
    }
    registration *r = find(ep, handle);
    if (r == NULL) {
        return cx_fail(CX_ERR_NOT_FOUND, "cx_mem_deregister: no registration %u", handle);
    }
    *r = ep->regs[--ep->num_regs]; /* order does not matter: move the last one into the hole */
    return cx_ok();
}

cx_status cx_mem_query(const cx_endpoint *ep, cx_mem_handle handle, void **addr,
                       uint64_t *length) {
    if (ep == NULL || addr == NULL || length == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_mem_query: arguments must not be NULL");
    }
    const registration *r = find(ep, handle);
    if (r == NULL) {
        return cx_fail(CX_ERR_NOT_FOUND, "cx_mem_query: no registration %u", handle);
    }
    *addr = (void *)r->addr;
    *length = r->length;
    return cx_ok();
}

cx_status cx_mem_count(const cx_endpoint *ep, size_t *count) {
    if (ep == NULL || count == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_mem_count: arguments must not be NULL");
    }
    *count = ep->num_regs;
    return cx_ok();
}

/* ---- network entry points: not built yet ---- */

cx_status cx_endpoint_conn_id(cx_endpoint *ep, void *buf, size_t cap, size_t *len) {
    (void)ep, (void)buf, (void)cap, (void)len;
    return cx_not_built("cx_endpoint_conn_id");
}

cx_status cx_endpoint_connect(cx_endpoint *ep, const void *conn_id, size_t len,
                              uint32_t timeout_ms, cx_peer *peer) {
    (void)ep, (void)conn_id, (void)len, (void)timeout_ms, (void)peer;
    return cx_not_built("cx_endpoint_connect");
}

cx_status cx_endpoint_accept(cx_endpoint *ep, uint32_t timeout_ms, cx_peer *peer) {
    (void)ep, (void)timeout_ms, (void)peer;
    return cx_not_built("cx_endpoint_accept");
}

cx_status cx_mem_export(cx_endpoint *ep, cx_mem_handle handle, void *buf, size_t cap,
                        size_t *len) {
    (void)ep, (void)handle, (void)buf, (void)cap, (void)len;
    return cx_not_built("cx_mem_export");
}

cx_status cx_mem_import(cx_endpoint *ep, cx_peer peer, const void *desc, size_t len,
                        cx_remote_handle *out) {
    (void)ep, (void)peer, (void)desc, (void)len, (void)out;
    return cx_not_built("cx_mem_import");
}

cx_status cx_post(cx_endpoint *ep, cx_peer peer, cx_op op, const cx_xfer *xfers, size_t n,
                  cx_request *out) {
    (void)ep, (void)peer, (void)op, (void)xfers, (void)n, (void)out;
    return cx_not_built("cx_post");
}

cx_status cx_test(cx_endpoint *ep, cx_request request, int *done) {
    (void)ep, (void)request, (void)done;
    return cx_not_built("cx_test");
}

cx_status cx_wait(cx_endpoint *ep, cx_request request, uint32_t timeout_ms) {
    (void)ep, (void)request, (void)timeout_ms;
    return cx_not_built("cx_wait");
}
