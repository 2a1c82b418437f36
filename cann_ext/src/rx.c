/* The receiver thread of a host TCP peer: reads framed messages and acts on each.
 *
 * It serves the peer's one-sided ops against our registrations (READ: queue the bytes for the
 * sender thread, straight from registered memory; WRITE: receive straight into it), records
 * the peer's RECVs for tag matching, and lands the answers to our own posts in their local
 * regions. Payloads are received without holding ep->mu; what they touch is pinned (a
 * registration) or cannot go away (an op of a request that is not done yet).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define OP_INDEX_MASK (((uint64_t)1 << CX_OP_INDEX_BITS) - 1)

static const char *op_name(cx_op op) {
    static const char *names[] = {"SEND", "RECV", "WRITE", "READ"};
    return (unsigned)op < 4 ? names[op] : "?";
}

/* Explains a short read: EOF, socket error, or a payload that stopped early. */
static void describe_loss(char *why, size_t cap, uint64_t got, uint64_t want, int err,
                          bool payload) {
    const char *cause = err ? strerror(err) : "peer closed the connection";
    if (!payload && got == 0) {
        snprintf(why, cap, "connection lost: %s", cause);
    } else {
        snprintf(why, cap, "partial transfer: got %llu of %llu %s bytes (%s)",
                 (unsigned long long)got, (unsigned long long)want,
                 payload ? "payload" : "header", cause);
    }
}

/* Queues an answer (ep->mu held); -1 when out of memory. */
static int answer(peer *p, const wire_hdr *h, const uint8_t *payload, cx_mem_handle unpin) {
    tx_item *item = calloc(1, sizeof *item);
    if (item == NULL) {
        return -1;
    }
    cx_wire_encode(h, item->hdr);
    item->payload = payload;
    item->payload_len = payload ? h->length : 0;
    item->owned = true;
    item->unpin = unpin;
    cx_peer_enqueue(p, item);
    return 0;
}

static int serve_read(peer *p, const wire_hdr *h, char *why, size_t cap) {
    cx_endpoint *ep = p->ep;
    pthread_mutex_lock(&ep->mu);
    registration *r = NULL;
    cx_status st = cx_reg_range(ep, h->handle, h->offset, h->length, &r);
    wire_hdr resp = {W_READ_RESP, h->id, h->handle, (uint32_t)st, h->offset,
                     st == CX_OK ? h->length : 0};
    const uint8_t *src = st == CX_OK ? (const uint8_t *)r->addr + h->offset : NULL;
    int rc = answer(p, &resp, src, src ? h->handle : 0);
    if (rc == 0 && src != NULL) {
        r->serving++; /* until the sender thread has sent the bytes */
    }
    pthread_mutex_unlock(&ep->mu);
    if (rc != 0) {
        snprintf(why, cap, "out of memory answering a READ");
    }
    return rc;
}

static int serve_write(peer *p, const wire_hdr *h, char *why, size_t cap) {
    cx_endpoint *ep = p->ep;
    pthread_mutex_lock(&ep->mu);
    registration *r = NULL;
    cx_status st = cx_reg_range(ep, h->handle, h->offset, h->length, &r);
    uint8_t *dst = NULL;
    if (st == CX_OK) {
        r->serving++;
        dst = (uint8_t *)r->addr + h->offset;
    }
    pthread_mutex_unlock(&ep->mu);
    int err = 0;
    uint64_t got = dst ? cx_recv_exact(p->fd, dst, h->length, &err)
                       : cx_recv_drop(p->fd, h->length, &err); /* refused: stay framed */
    pthread_mutex_lock(&ep->mu);
    if (dst != NULL) {
        cx_reg_unpin(ep, h->handle, true);
    }
    int rc = 0;
    if (got < h->length) {
        describe_loss(why, cap, got, h->length, err, true);
        rc = -1;
    } else {
        wire_hdr ack = {W_WRITE_ACK, h->id, h->handle, (uint32_t)st, h->offset, 0};
        rc = answer(p, &ack, NULL, 0);
        if (rc != 0) {
            snprintf(why, cap, "out of memory acknowledging a WRITE");
        }
    }
    pthread_mutex_unlock(&ep->mu);
    return rc;
}

/* The op an answer is for (ep->mu held), or NULL with `why` set: a protocol error. */
static request *answered_op(peer *p, const wire_hdr *h, cx_op want, uint32_t *index, char *why,
                            size_t cap) {
    request *req = cx_request_find(p->ep, h->id >> CX_OP_INDEX_BITS);
    *index = (uint32_t)(h->id & OP_INDEX_MASK);
    if (req == NULL || req->peer != p->id || req->op != want || *index >= req->n ||
        req->op_done[*index]) {
        snprintf(why, cap, "protocol error: answer (wire op %u) for unknown op id %llx", h->op,
                 (unsigned long long)h->id);
        return NULL;
    }
    return req;
}

static void complete_refused(peer *p, request *req, uint32_t index, const wire_hdr *h) {
    char detail[CX_DETAIL_BYTES];
    const cx_xfer *x = &req->xfers[index];
    snprintf(detail, sizeof detail, "%s[%u] (remote registration %u, [%llu, +%llu)): peer "
             "answered: %s", op_name(req->op), index, req->remote_mem[index],
             (unsigned long long)x->remote_offset, (unsigned long long)x->length,
             cx_status_string((cx_status)h->status));
    cx_op_complete(p->ep, req, index, (cx_status)h->status, detail);
}

/* READ_RESP / SEND_DATA: the payload goes straight into the op's local region. */
static int land_payload(peer *p, const wire_hdr *h, cx_op want, char *why, size_t cap) {
    cx_endpoint *ep = p->ep;
    pthread_mutex_lock(&ep->mu);
    uint32_t index = 0;
    request *req = answered_op(p, h, want, &index, why, cap);
    uint8_t *dst = NULL;
    if (req != NULL && h->status != CX_OK) {
        complete_refused(p, req, index, h);
    } else if (req != NULL && h->length != req->xfers[index].length) {
        snprintf(why, cap, "protocol error: %s[%u] answered with %llu bytes, asked %llu",
                 op_name(want), index, (unsigned long long)h->length,
                 (unsigned long long)req->xfers[index].length);
        req = NULL;
    } else if (req != NULL) {
        dst = req->local[index];
    }
    pthread_mutex_unlock(&ep->mu);
    if (req == NULL) {
        return -1;
    }
    if (dst == NULL) {
        return 0;
    }
    int err = 0;
    uint64_t got = cx_recv_exact(p->fd, dst, h->length, &err);
    if (got < h->length) {
        describe_loss(why, cap, got, h->length, err, true);
        return -1; /* the op fails with the peer, carrying this reason */
    }
    pthread_mutex_lock(&ep->mu);
    cx_op_complete(ep, req, index, CX_OK, NULL);
    pthread_mutex_unlock(&ep->mu);
    return 0;
}

static int take_ack(peer *p, const wire_hdr *h, char *why, size_t cap) {
    pthread_mutex_lock(&p->ep->mu);
    uint32_t index = 0;
    request *req = answered_op(p, h, CX_OP_WRITE, &index, why, cap);
    if (req != NULL && h->status != CX_OK) {
        complete_refused(p, req, index, h);
    } else if (req != NULL) {
        cx_op_complete(p->ep, req, index, CX_OK, NULL);
    }
    pthread_mutex_unlock(&p->ep->mu);
    return req != NULL ? 0 : -1;
}

static int take_recv_ready(peer *p, const wire_hdr *h, char *why, size_t cap) {
    match_slot *slot = calloc(1, sizeof *slot);
    if (slot == NULL) {
        snprintf(why, cap, "out of memory for a peer's RECV");
        return -1;
    }
    *slot = (match_slot){NULL, h->handle, h->length, NULL, 0, h->id};
    pthread_mutex_lock(&p->ep->mu);
    if (p->readies.tail != NULL) {
        p->readies.tail->next = slot;
    } else {
        p->readies.head = slot;
    }
    p->readies.tail = slot;
    cx_peer_match(p);
    pthread_mutex_unlock(&p->ep->mu);
    return 0;
}

static int dispatch(peer *p, const wire_hdr *h, char *why, size_t cap) {
    switch (h->op) {
    case W_READ_REQ: return serve_read(p, h, why, cap);
    case W_WRITE_REQ: return serve_write(p, h, why, cap);
    case W_READ_RESP: return land_payload(p, h, CX_OP_READ, why, cap);
    case W_SEND_DATA: return land_payload(p, h, CX_OP_RECV, why, cap);
    case W_WRITE_ACK: return take_ack(p, h, why, cap);
    case W_RECV_READY: return take_recv_ready(p, h, why, cap);
    default: break;
    }
    snprintf(why, cap, "protocol error: unexpected wire op %u", h->op);
    return -1;
}

void *cx_rx_main(void *arg) {
    peer *p = arg;
    char why[CX_DETAIL_BYTES] = "";
    for (;;) {
        uint8_t buf[CX_WIRE_HDR_BYTES];
        wire_hdr h;
        int err = 0;
        uint64_t got = cx_recv_exact(p->fd, buf, sizeof buf, &err);
        if (got < sizeof buf) {
            describe_loss(why, sizeof why, got, sizeof buf, err, false);
            break;
        }
        if (cx_wire_decode(buf, &h, why, sizeof why) != 0 || dispatch(p, &h, why, sizeof why)) {
            break;
        }
    }
    cx_peer_exit(p, why);
    return NULL;
}
