/* Posted batches (requests): validation, launch onto a peer, completion, cx_test / cx_wait.
 *
 * Lifecycle of a request:
 *   1. cx_post checks every range of the batch (nothing moves if one is bad), pins the local
 *      registrations and queues one wire message per op (SEND ops wait for a matching RECV);
 *   2. each op completes once: on its answer (READ data landed, WRITE acknowledged, RECV data
 *      landed), when its bytes are sent (SEND), or when the peer dies (CX_ERR_CONNECTION);
 *   3. cx_test / cx_wait return the first failure (or CX_OK) once all ops completed and free
 *      the request; a timed-out cx_wait leaves it live.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define MAX_REQUEST_ID (((uint64_t)1 << (64 - CX_OP_INDEX_BITS)) - 1)

request *cx_request_find(cx_endpoint *ep, cx_request id) {
    for (request *req = ep->requests; req != NULL; req = req->next) {
        if (req->id == id) {
            return req;
        }
    }
    return NULL;
}

static void free_request(request *req) {
    if (req != NULL) {
        free(req->xfers);
        free(req->local);
        free(req->remote_mem);
        free(req->op_done);
        free(req->items);
        free(req);
    }
}

static request *new_request(cx_op op, const cx_xfer *xfers, size_t n) {
    request *req = calloc(1, sizeof *req);
    if (req == NULL) {
        return NULL;
    }
    req->xfers = malloc(n * sizeof *req->xfers);
    req->local = calloc(n, sizeof *req->local);
    req->remote_mem = calloc(n, sizeof *req->remote_mem);
    req->op_done = calloc(n, sizeof *req->op_done);
    req->items = calloc(n, sizeof *req->items);
    if (!req->xfers || !req->local || !req->remote_mem || !req->op_done || !req->items) {
        free_request(req);
        return NULL;
    }
    memcpy(req->xfers, xfers, n * sizeof *xfers);
    req->op = op;
    req->n = req->remaining = n;
    return req;
}

void cx_op_complete(cx_endpoint *ep, request *req, uint32_t index, cx_status status,
                    const char *detail) {
    if (req->op_done[index]) {
        return;
    }
    req->op_done[index] = 1;
    cx_reg_unpin(ep, req->xfers[index].local, false);
    if (status != CX_OK && req->status == CX_OK) {
        req->status = status;
        snprintf(req->detail, sizeof req->detail, "%s", detail ? detail : "");
    }
    if (--req->remaining == 0) {
        pthread_cond_broadcast(&ep->cv);
    }
}

void cx_requests_fail_peer(cx_endpoint *ep, peer *p) {
    char detail[CX_DETAIL_BYTES];
    int used = snprintf(detail, sizeof detail, "peer %u: ", p->id);
    memcpy(detail + used, p->detail, sizeof detail - (size_t)used - 1); /* keeps the prefix */
    detail[sizeof detail - 1] = '\0';
    for (request *req = ep->requests; req != NULL; req = req->next) {
        for (size_t i = 0; req->peer == p->id && req->remaining > 0 && i < req->n; i++) {
            cx_op_complete(ep, req, (uint32_t)i, CX_ERR_CONNECTION, detail);
        }
    }
}

/* Re-raises the detail of a failed range check with the op it belongs to. */
static cx_status fail_xfer(cx_status st, size_t i, const char *side) {
    char inner[CX_DETAIL_BYTES];
    snprintf(inner, sizeof inner, "%s", cx_last_error());
    return cx_fail(st, "cx_post: xfers[%zu] %s: %s", i, side, inner);
}

static cx_status check_remote(cx_endpoint *ep, cx_peer peer_id, const cx_xfer *x, size_t i,
                              uint32_t *mem) {
    const remote_region *rr = cx_remote_find(ep, x->remote);
    if (rr == NULL) {
        return cx_fail(CX_ERR_NOT_FOUND, "cx_post: xfers[%zu]: no imported region %u", i,
                       x->remote);
    }
    if (rr->peer != peer_id) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_post: xfers[%zu]: imported region %u belongs to "
                       "peer %u, not %u", i, x->remote, rr->peer, peer_id);
    }
    if (x->remote_offset > rr->length || x->length > rr->length - x->remote_offset) {
        return cx_fail(CX_ERR_OUT_OF_RANGE, "cx_post: xfers[%zu] remote: range [%llu, +%llu) is "
                       "outside imported region %u of %llu bytes", i,
                       (unsigned long long)x->remote_offset, (unsigned long long)x->length,
                       x->remote, (unsigned long long)rr->length);
    }
    if (x->tag != 0) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_post: xfers[%zu]: WRITE/READ take tag 0", i);
    }
    *mem = rr->mem;
    return CX_OK;
}

static cx_status check_xfer(cx_endpoint *ep, cx_peer peer_id, request *req, size_t i) {
    const cx_xfer *x = &req->xfers[i];
    if (x->length == 0) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_post: xfers[%zu].length is 0", i);
    }
    registration *r = NULL;
    cx_status st = cx_reg_range(ep, x->local, x->local_offset, x->length, &r);
    if (st != CX_OK) {
        return fail_xfer(st, i, "local");
    }
    req->local[i] = (uint8_t *)r->addr + x->local_offset;
    if (req->op == CX_OP_SEND || req->op == CX_OP_RECV) {
        if (x->remote != 0 || x->remote_offset != 0) {
            return cx_fail(CX_ERR_INVALID_ARG, "cx_post: xfers[%zu]: SEND/RECV take remote 0", i);
        }
        return CX_OK;
    }
    return check_remote(ep, peer_id, x, i, &req->remote_mem[i]);
}

/* Queues op i on the peer; SEND ops join the peer's unmatched sends instead. */
static void launch(peer *p, request *req, size_t i, match_slot *slot) {
    const cx_xfer *x = &req->xfers[i];
    uint64_t wire_id = (req->id << CX_OP_INDEX_BITS) | i;
    if (req->op == CX_OP_SEND) {
        *slot = (match_slot){NULL, x->tag, x->length, req, (uint32_t)i, 0};
        if (p->sends.tail != NULL) {
            p->sends.tail->next = slot;
        } else {
            p->sends.head = slot;
        }
        p->sends.tail = slot;
        return;
    }
    static const uint16_t wire_ops[] = {0, W_RECV_READY, W_WRITE_REQ, W_READ_REQ};
    wire_hdr h = {wire_ops[req->op], wire_id, req->op == CX_OP_RECV ? x->tag : req->remote_mem[i],
                  0, x->remote_offset, x->length};
    tx_item *item = &req->items[i];
    cx_wire_encode(&h, item->hdr);
    if (req->op == CX_OP_WRITE) {
        item->payload = req->local[i];
        item->payload_len = x->length;
    }
    cx_peer_enqueue(p, item);
}

static cx_status alloc_slots(request *req, match_slot ***slots) {
    *slots = NULL;
    if (req->op != CX_OP_SEND) {
        return CX_OK;
    }
    *slots = calloc(req->n, sizeof **slots);
    for (size_t i = 0; *slots != NULL && i < req->n; i++) {
        (*slots)[i] = malloc(sizeof ***slots);
        if ((*slots)[i] == NULL) {
            for (size_t j = 0; j < i; j++) {
                free((*slots)[j]);
            }
            free(*slots);
            *slots = NULL;
        }
    }
    return *slots ? CX_OK : cx_fail(CX_ERR_NO_MEMORY, "cx_post: out of memory");
}

static cx_status check_peer(cx_endpoint *ep, cx_peer peer_id, peer **out) {
    peer *p = cx_peer_get(ep, peer_id);
    if (p == NULL) {
        return cx_fail(CX_ERR_NOT_FOUND, "cx_post: no peer %u", peer_id);
    }
    if (p->dead) {
        return cx_fail(CX_ERR_CONNECTION, "cx_post: peer %u is gone: %s", peer_id, p->detail);
    }
    if (ep->num_requests >= ep->max_inflight) {
        return cx_fail(CX_ERR_BUSY, "cx_post: %zu requests in flight (max_inflight %u); reap "
                       "some with cx_test/cx_wait", ep->num_requests, ep->max_inflight);
    }
    if (ep->next_request > MAX_REQUEST_ID) {
        return cx_fail(CX_ERR_NO_MEMORY, "cx_post: request ids exhausted");
    }
    *out = p;
    return CX_OK;
}

static cx_status post_locked(cx_endpoint *ep, cx_peer peer_id, cx_op op, const cx_xfer *xfers,
                             size_t n, cx_request *out) {
    peer *p = NULL;
    cx_status st = check_peer(ep, peer_id, &p);
    if (st != CX_OK) {
        return st;
    }
    request *req = new_request(op, xfers, n);
    if (req == NULL) {
        return cx_fail(CX_ERR_NO_MEMORY, "cx_post: out of memory for %zu transfers", n);
    }
    for (size_t i = 0; st == CX_OK && i < n; i++) {
        st = check_xfer(ep, peer_id, req, i);
    }
    match_slot **slots = NULL;
    if (st == CX_OK) {
        st = alloc_slots(req, &slots);
    }
    if (st != CX_OK) {
        free_request(req);
        return st;
    }
    req->id = ep->next_request++;
    req->peer = peer_id;
    req->next = ep->requests;
    ep->requests = req;
    ep->num_requests++;
    for (size_t i = 0; i < n; i++) {
        cx_reg_find(ep, xfers[i].local)->pins++; /* checked above, under the same lock */
        launch(p, req, i, slots ? slots[i] : NULL);
    }
    free(slots);
    cx_peer_match(p);
    *out = req->id;
    return CX_OK;
}

cx_status cx_post(cx_endpoint *ep, cx_peer peer, cx_op op, const cx_xfer *xfers, size_t n,
                  cx_request *out) {
    if (ep == NULL || xfers == NULL || out == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_post: ep, xfers and out must not be NULL");
    }
    if (n == 0 || n > CX_MAX_BATCH) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_post: n = %zu, want 1..%zu", n, CX_MAX_BATCH);
    }
    if ((unsigned)op > CX_OP_READ) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_post: unknown op %d", (int)op);
    }
    pthread_mutex_lock(&ep->mu);
    cx_status st = post_locked(ep, peer, op, xfers, n, out);
    pthread_mutex_unlock(&ep->mu);
    return st == CX_OK ? cx_ok() : st;
}

/* Unlinks and frees a finished request (ep->mu held); returns its final status. */
static cx_status reap(cx_endpoint *ep, request *req) {
    request **link = &ep->requests;
    while (*link != req) {
        link = &(*link)->next;
    }
    *link = req->next;
    ep->num_requests--;
    cx_status st = req->status;
    if (st != CX_OK) {
        cx_fail(st, "%s", req->detail);
    }
    free_request(req);
    return st == CX_OK ? cx_ok() : st;
}

cx_status cx_test(cx_endpoint *ep, cx_request request_id, int *done) {
    if (ep == NULL || done == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_test: ep and done must not be NULL");
    }
    pthread_mutex_lock(&ep->mu);
    request *req = cx_request_find(ep, request_id);
    cx_status st = req ? CX_OK : cx_fail(CX_ERR_NOT_FOUND, "cx_test: no request %llu",
                                          (unsigned long long)request_id);
    *done = req != NULL && req->remaining == 0;
    if (*done) {
        st = reap(ep, req);
    }
    pthread_mutex_unlock(&ep->mu);
    return st == CX_OK ? cx_ok() : st;
}

cx_status cx_wait(cx_endpoint *ep, cx_request request_id, uint32_t timeout_ms) {
    if (ep == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_wait: ep must not be NULL");
    }
    struct timespec deadline = cx_deadline(timeout_ms);
    pthread_mutex_lock(&ep->mu);
    request *req = cx_request_find(ep, request_id);
    cx_status st = req ? CX_OK : cx_fail(CX_ERR_NOT_FOUND, "cx_wait: no request %llu",
                                          (unsigned long long)request_id);
    while (st == CX_OK && req->remaining > 0) {
        if (cx_cond_wait(&ep->cv, &ep->mu, timeout_ms, &deadline) == ETIMEDOUT &&
            req->remaining > 0) {
            st = cx_fail(CX_ERR_TIMEOUT, "cx_wait: request %llu not done after %u ms (%zu of %zu "
                         "ops pending)", (unsigned long long)request_id, timeout_ms,
                         req->remaining, req->n);
        }
    }
    if (st == CX_OK) {
        st = reap(ep, req);
    }
    pthread_mutex_unlock(&ep->mu);
    return st;
}
