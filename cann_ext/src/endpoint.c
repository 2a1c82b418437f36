/* Endpoint objects and memory registration bookkeeping.
 *
 * Lifecycle of a registration:
 *   1. cx_mem_register records [addr, addr + length) under a fresh non-zero handle;
 *   2. transfers check their ranges against it and pin it while bytes move (local posts until
 *      their op completes, a peer's READ/WRITE while the progress threads serve it);
 *   3. cx_mem_deregister forgets it (CX_ERR_BUSY while pinned); cx_endpoint_destroy refuses
 *      while any remain.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

static uint64_t make_nonce(const void *salt) {
    uint64_t nonce = 0;
    if (getrandom(&nonce, sizeof nonce, 0) != (ssize_t)sizeof nonce) {
        struct timespec ts; /* fallback: unique enough to tell endpoint incarnations apart */
        clock_gettime(CLOCK_REALTIME, &ts);
        nonce = ((uint64_t)ts.tv_sec << 32) ^ (uint64_t)ts.tv_nsec ^ ((uint64_t)getpid() << 16) ^
                (uint64_t)(uintptr_t)salt;
    }
    return nonce == 0 ? 1 : nonce;
}

static cx_status check_config(const cx_endpoint_config *config) {
    if (config->backend == CX_BACKEND_NCCL || config->backend == CX_BACKEND_HCCL) {
        return cx_fail(CX_ERR_UNSUPPORTED, "cx_endpoint_create: backend %d is not built yet",
                       (int)config->backend);
    }
    if (config->backend != CX_BACKEND_HOST_TCP) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_endpoint_create: unknown backend %d",
                       (int)config->backend);
    }
    const char *bind = config->bind_address;
    if (bind != NULL && strlen(bind) >= sizeof ((cx_endpoint *)0)->bind_address) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_endpoint_create: bind_address is too long");
    }
    return CX_OK;
}

static int init_sync(cx_endpoint *ep) {
    pthread_condattr_t attr;
    if (pthread_condattr_init(&attr) != 0) {
        return -1;
    }
    /* cx_wait / cx_endpoint_accept deadlines must not jump with the wall clock. */
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    int rc = pthread_cond_init(&ep->cv, &attr);
    pthread_condattr_destroy(&attr);
    if (rc != 0) {
        return -1;
    }
    if (pthread_mutex_init(&ep->mu, NULL) != 0) {
        pthread_cond_destroy(&ep->cv);
        return -1;
    }
    return 0;
}

cx_status cx_endpoint_create(const cx_endpoint_config *config, cx_endpoint **out) {
    if (config == NULL || out == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_endpoint_create: config and out must not be NULL");
    }
    *out = NULL;
    cx_status st = check_config(config);
    if (st != CX_OK) {
        return st;
    }
    cx_endpoint *ep = calloc(1, sizeof *ep);
    if (ep == NULL || init_sync(ep) != 0) {
        free(ep);
        return cx_fail(CX_ERR_NO_MEMORY, "cx_endpoint_create: out of memory");
    }
    ep->backend = config->backend;
    ep->device_id = config->device_id;
    ep->timeout_ms = config->timeout_ms;
    ep->max_inflight = config->max_inflight ? config->max_inflight : CX_DEFAULT_MAX_INFLIGHT;
    strcpy(ep->bind_address, config->bind_address ? config->bind_address : "127.0.0.1:0");
    ep->nonce = make_nonce(ep);
    ep->next_handle = 1;
    ep->next_request = 1;
    ep->listen_fd = -1;
    *out = ep;
    return cx_ok();
}

cx_status cx_endpoint_destroy(cx_endpoint *ep) {
    if (ep == NULL) {
        return cx_ok();
    }
    pthread_mutex_lock(&ep->mu);
    size_t regs = ep->num_regs, reqs = ep->num_requests;
    if (regs == 0 && reqs == 0) {
        ep->closing = true;
    }
    pthread_mutex_unlock(&ep->mu);
    if (regs > 0) {
        return cx_fail(CX_ERR_BUSY, "cx_endpoint_destroy: %zu registration(s) still live", regs);
    }
    if (reqs > 0) {
        return cx_fail(CX_ERR_BUSY,
                       "cx_endpoint_destroy: %zu request(s) not yet reaped by cx_test/cx_wait",
                       reqs);
    }
    cx_listener_stop(ep);
    cx_peers_stop(ep); /* joins every progress thread: nothing touches ep after this */
    pthread_cond_destroy(&ep->cv);
    pthread_mutex_destroy(&ep->mu);
    free(ep->regs);
    free(ep->accepted);
    free(ep->remotes);
    free(ep);
    return cx_ok();
}

int cx_grow(void **items, size_t *cap, size_t need, size_t size) {
    if (need <= *cap) {
        return 0;
    }
    size_t grown = *cap == 0 ? 8 : *cap;
    while (grown < need) {
        grown *= 2;
    }
    void *p = realloc(*items, grown * size);
    if (p == NULL) {
        return -1;
    }
    *items = p;
    *cap = grown;
    return 0;
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

static cx_status add_registration(cx_endpoint *ep, void *addr, uint64_t length, cx_mem_kind kind,
                                  cx_mem_handle *out) {
    cx_status st = check_new_range(ep, addr, length, kind);
    if (st != CX_OK) {
        return st;
    }
    if (cx_grow((void **)&ep->regs, &ep->cap_regs, ep->num_regs + 1, sizeof *ep->regs) != 0) {
        return cx_fail(CX_ERR_NO_MEMORY, "cx_mem_register: out of memory");
    }
    if (ep->next_handle == 0) {
        return cx_fail(CX_ERR_NO_MEMORY, "cx_mem_register: handle space exhausted");
    }
    registration *r = &ep->regs[ep->num_regs++];
    *r = (registration){ep->next_handle++, (uintptr_t)addr, length, kind, 0, 0};
    *out = r->handle;
    return cx_ok();
}

cx_status cx_mem_register(cx_endpoint *ep, void *addr, uint64_t length, cx_mem_kind kind,
                          cx_mem_handle *out) {
    if (ep == NULL || out == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_mem_register: ep and out must not be NULL");
    }
    pthread_mutex_lock(&ep->mu);
    cx_status st = add_registration(ep, addr, length, kind, out);
    pthread_mutex_unlock(&ep->mu);
    return st;
}

registration *cx_reg_find(cx_endpoint *ep, cx_mem_handle handle) {
    for (size_t i = 0; i < ep->num_regs; i++) {
        if (ep->regs[i].handle == handle) {
            return &ep->regs[i];
        }
    }
    return NULL;
}

cx_status cx_reg_range(cx_endpoint *ep, cx_mem_handle handle, uint64_t offset, uint64_t length,
                       registration **out) {
    registration *r = cx_reg_find(ep, handle);
    if (r == NULL) {
        return cx_fail(CX_ERR_NOT_FOUND, "no registration %u", handle);
    }
    if (length == 0 || offset > r->length || length > r->length - offset) {
        return cx_fail(CX_ERR_OUT_OF_RANGE,
                       "range [%llu, +%llu) is outside registration %u of %llu bytes",
                       (unsigned long long)offset, (unsigned long long)length, handle,
                       (unsigned long long)r->length);
    }
    *out = r;
    return CX_OK;
}

void cx_reg_unpin(cx_endpoint *ep, cx_mem_handle handle, bool serving) {
    registration *r = cx_reg_find(ep, handle);
    uint32_t *count = r == NULL ? NULL : serving ? &r->serving : &r->pins;
    if (count != NULL && *count > 0 && --*count == 0 && serving) {
        pthread_cond_broadcast(&ep->cv);
    }
}

static cx_status remove_registration(cx_endpoint *ep, cx_mem_handle handle) {
    registration *r = cx_reg_find(ep, handle);
    if (r == NULL) {
        return cx_fail(CX_ERR_NOT_FOUND, "cx_mem_deregister: no registration %u", handle);
    }
    if (r->pins > 0) {
        return cx_fail(CX_ERR_BUSY, "cx_mem_deregister: registration %u is in use by %u posted "
                       "transfer(s)", handle, r->pins);
    }
    /* A peer may finish reading our bytes (its op done) a moment before our sender thread
     * lets go of them: wait for that, up to the endpoint timeout. */
    struct timespec deadline = cx_deadline(ep->timeout_ms);
    while (r != NULL && r->serving > 0) {
        if (cx_cond_wait(&ep->cv, &ep->mu, ep->timeout_ms, &deadline) == ETIMEDOUT) {
            return cx_fail(CX_ERR_BUSY, "cx_mem_deregister: registration %u is still being "
                           "served to a peer after %u ms", handle, ep->timeout_ms);
        }
        r = cx_reg_find(ep, handle); /* the array may have moved while we slept */
    }
    if (r == NULL) {
        return cx_fail(CX_ERR_NOT_FOUND, "cx_mem_deregister: no registration %u", handle);
    }
    *r = ep->regs[--ep->num_regs]; /* order does not matter: move the last one into the hole */
    return cx_ok();
}

cx_status cx_mem_deregister(cx_endpoint *ep, cx_mem_handle handle) {
    if (ep == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_mem_deregister: ep must not be NULL");
    }
    pthread_mutex_lock(&ep->mu);
    cx_status st = remove_registration(ep, handle);
    pthread_mutex_unlock(&ep->mu);
    return st;
}

cx_status cx_mem_query(const cx_endpoint *ep, cx_mem_handle handle, void **addr,
                       uint64_t *length) {
    if (ep == NULL || addr == NULL || length == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_mem_query: arguments must not be NULL");
    }
    cx_endpoint *mut = (cx_endpoint *)ep; /* the lock is not part of the endpoint's value */
    pthread_mutex_lock(&mut->mu);
    const registration *r = cx_reg_find(mut, handle);
    if (r != NULL) {
        *addr = (void *)r->addr;
        *length = r->length;
    }
    pthread_mutex_unlock(&mut->mu);
    if (r == NULL) {
        return cx_fail(CX_ERR_NOT_FOUND, "cx_mem_query: no registration %u", handle);
    }
    return cx_ok();
}

cx_status cx_mem_count(const cx_endpoint *ep, size_t *count) {
    if (ep == NULL || count == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_mem_count: arguments must not be NULL");
    }
    cx_endpoint *mut = (cx_endpoint *)ep;
    pthread_mutex_lock(&mut->mu);
    *count = ep->num_regs;
    pthread_mutex_unlock(&mut->mu);
    return cx_ok();
}
