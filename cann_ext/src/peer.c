/* Host TCP peers: one connected socket, a receiver thread (rx.c) and a sender thread (here).
 *
 * Lifecycle of a peer:
 *   1. cx_peer_start (after the HELLO handshake) starts both threads;
 *   2. posts and the receiver queue framed messages (tx_item) that the sender writes out with
 *      sendmsg() straight from registered memory; the receiver only ever reads, so two peers
 *      serving each other's large READs cannot deadlock on full socket buffers;
 *   3. on a socket error, EOF or protocol error, the thread that notices marks the peer dead
 *      (first reason wins) and shuts the socket, which stops the other; the last thread out
 *      frees the queues and fails every pending op of the peer with CX_ERR_CONNECTION;
 *   4. cx_endpoint_destroy marks live peers dead, joins their threads and frees them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"

/* Messages per sendmsg(): header + payload each, within IOV_MAX (1024). */
#define TX_BATCH 256

peer *cx_peer_get(cx_endpoint *ep, cx_peer id) {
    return id >= 1 && id <= ep->num_peers ? ep->peers[id - 1] : NULL;
}

void cx_peer_enqueue(peer *p, tx_item *item) {
    item->next = NULL;
    if (p->tx_tail != NULL) {
        p->tx_tail->next = item;
    } else {
        p->tx_head = item;
    }
    p->tx_tail = item;
    pthread_cond_signal(&p->tx_cv);
}

static void free_slots(slot_list *list) {
    while (list->head != NULL) {
        match_slot *next = list->head->next;
        free(list->head);
        list->head = next;
    }
    list->tail = NULL;
}

/* Marks the peer dead (ep->mu held); its threads stop at their next step. */
static void mark_dead(peer *p, const char *why) {
    if (p->dead) {
        return;
    }
    p->dead = true;
    snprintf(p->detail, sizeof p->detail, "%s", why);
    shutdown(p->fd, SHUT_RDWR); /* wakes the receiver blocked in recv() */
    pthread_cond_broadcast(&p->tx_cv);
}

/* Both threads are gone (ep->mu held): free the queues, fail what is pending. */
static void teardown(peer *p) {
    cx_endpoint *ep = p->ep;
    while (p->tx_head != NULL) {
        tx_item *item = p->tx_head;
        p->tx_head = item->next;
        if (item->unpin != 0) {
            cx_reg_unpin(ep, item->unpin, true);
        }
        if (item->owned) {
            free(item);
        }
    }
    p->tx_tail = NULL;
    free_slots(&p->sends);
    free_slots(&p->readies);
    cx_requests_fail_peer(ep, p);
    close(p->fd);
    p->fd = -1;
    pthread_cond_broadcast(&ep->cv);
}

void cx_peer_exit(peer *p, const char *why) {
    pthread_mutex_lock(&p->ep->mu);
    mark_dead(p, why);
    if (--p->threads_alive == 0) {
        teardown(p);
    }
    pthread_mutex_unlock(&p->ep->mu);
}

/* Pops up to TX_BATCH messages into iov; `after` gets those needing work once sent. Headers
 * are copied into `hdrs`: a request-owned item may be freed as soon as the peer answered,
 * which can happen before sendmsg() returns to us. */
static int take_batch(peer *p, struct iovec *iov, uint8_t (*hdrs)[CX_WIRE_HDR_BYTES],
                      tx_item **after, int *num_after) {
    int n = 0;
    *num_after = 0;
    for (int k = 0; k < TX_BATCH && p->tx_head != NULL; k++) {
        tx_item *item = p->tx_head;
        p->tx_head = item->next;
        memcpy(hdrs[k], item->hdr, CX_WIRE_HDR_BYTES);
        iov[n++] = (struct iovec){hdrs[k], CX_WIRE_HDR_BYTES};
        if (item->payload_len > 0) {
            iov[n++] = (struct iovec){(void *)item->payload, (size_t)item->payload_len};
        }
        /* Request-owned items without completion work may be freed by the time the bytes are
         * out (their answer can arrive first), so only these are touched again. */
        if (item->owned || item->done_req != NULL || item->unpin != 0) {
            after[(*num_after)++] = item;
        }
    }
    if (p->tx_head == NULL) {
        p->tx_tail = NULL;
    }
    return n;
}

static void finish_batch(cx_endpoint *ep, tx_item **after, int num_after, bool sent) {
    for (int k = 0; k < num_after; k++) {
        tx_item *item = after[k];
        if (item->unpin != 0) {
            cx_reg_unpin(ep, item->unpin, true);
        }
        if (sent && item->done_req != NULL) {
            cx_op_complete(ep, item->done_req, item->done_index, CX_OK, NULL);
        }
        if (item->owned) {
            free(item);
        }
    }
}

static void *tx_main(void *arg) {
    peer *p = arg;
    cx_endpoint *ep = p->ep;
    struct iovec iov[2 * TX_BATCH];
    uint8_t hdrs[TX_BATCH][CX_WIRE_HDR_BYTES];
    tx_item *after[TX_BATCH];
    char why[CX_DETAIL_BYTES] = "sender stopped";
    pthread_mutex_lock(&ep->mu);
    for (;;) {
        while (!p->dead && p->tx_head == NULL) {
            pthread_cond_wait(&p->tx_cv, &ep->mu);
        }
        if (p->dead) {
            break;
        }
        int num_after = 0;
        int n = take_batch(p, iov, hdrs, after, &num_after);
        pthread_mutex_unlock(&ep->mu);
        int err = cx_send_iov(p->fd, iov, n);
        pthread_mutex_lock(&ep->mu);
        finish_batch(ep, after, num_after, err == 0);
        if (err != 0) {
            snprintf(why, sizeof why, "connection lost while sending: %s", strerror(err));
            break;
        }
    }
    pthread_mutex_unlock(&ep->mu);
    cx_peer_exit(p, why);
    return NULL;
}

static peer *new_peer(cx_endpoint *ep, int fd, uint64_t remote_nonce) {
    if (cx_grow((void **)&ep->peers, &ep->cap_peers, ep->num_peers + 1, sizeof *ep->peers) != 0) {
        return NULL;
    }
    peer *p = calloc(1, sizeof *p);
    if (p == NULL || pthread_cond_init(&p->tx_cv, NULL) != 0) {
        free(p);
        return NULL;
    }
    p->ep = ep;
    p->fd = fd;
    p->remote_nonce = remote_nonce;
    return p;
}

cx_status cx_peer_start(cx_endpoint *ep, int fd, uint64_t remote_nonce, cx_peer *out) {
    if (ep->num_peers >= UINT32_MAX - 1) {
        return cx_fail(CX_ERR_NO_MEMORY, "peer ids exhausted");
    }
    peer *p = new_peer(ep, fd, remote_nonce);
    if (p == NULL) {
        return cx_fail(CX_ERR_NO_MEMORY, "out of memory for a peer");
    }
    if (pthread_create(&p->rx, NULL, cx_rx_main, p) != 0) {
        pthread_cond_destroy(&p->tx_cv);
        free(p);
        return cx_fail(CX_ERR_NO_MEMORY, "cannot start a receiver thread");
    }
    /* From here the peer owns fd; it is listed so destroy joins whatever thread runs. */
    p->threads_alive = 1;
    ep->peers[ep->num_peers++] = p;
    p->id = (cx_peer)ep->num_peers;
    if (pthread_create(&p->tx, NULL, tx_main, p) != 0) {
        p->tx = p->rx; /* joined once in cx_peers_stop: see there */
        mark_dead(p, "cannot start a sender thread");
    } else {
        p->threads_alive = 2;
    }
    *out = p->id;
    return CX_OK;
}

/* Pairs the oldest matching RECV for one SEND slot; returns whether it matched. */
static bool match_one(peer *p, match_slot *send) {
    match_slot *prev = NULL, *ready = p->readies.head;
    while (ready != NULL && ready->tag != send->tag) {
        prev = ready;
        ready = ready->next;
    }
    if (ready == NULL) {
        return false;
    }
    if (prev != NULL) {
        prev->next = ready->next;
    } else {
        p->readies.head = ready->next;
    }
    if (p->readies.tail == ready) {
        p->readies.tail = prev;
    }
    request *req = send->req;
    bool fits = ready->length == send->length;
    /* A refusal completes our op at once, so its message may not live in the request. */
    tx_item *item = fits ? &req->items[send->index] : calloc(1, sizeof *item);
    if (item != NULL) {
        wire_hdr h = {W_SEND_DATA, ready->wire_id, send->tag,
                      fits ? CX_OK : CX_ERR_OUT_OF_RANGE, 0, fits ? send->length : 0};
        cx_wire_encode(&h, item->hdr);
        item->payload = fits ? req->local[send->index] : NULL;
        item->payload_len = h.length;
        item->owned = !fits;
        item->done_req = fits ? req : NULL;
        item->done_index = send->index;
        cx_peer_enqueue(p, item);
    }
    if (!fits) {
        char detail[CX_DETAIL_BYTES];
        snprintf(detail, sizeof detail, "SEND[%u] of %llu bytes met a RECV of %llu (tag %u)",
                 send->index, (unsigned long long)send->length,
                 (unsigned long long)ready->length, send->tag);
        cx_op_complete(p->ep, req, send->index, CX_ERR_OUT_OF_RANGE, detail);
    }
    free(ready);
    return true;
}

void cx_peer_match(peer *p) {
    match_slot *prev = NULL, *send = p->sends.head;
    while (send != NULL && p->readies.head != NULL) {
        match_slot *next = send->next;
        if (match_one(p, send)) {
            if (prev != NULL) {
                prev->next = next;
            } else {
                p->sends.head = next;
            }
            if (p->sends.tail == send) {
                p->sends.tail = prev;
            }
            free(send);
        } else {
            prev = send;
        }
        send = next;
    }
}

void cx_peers_stop(cx_endpoint *ep) {
    pthread_mutex_lock(&ep->mu);
    for (size_t i = 0; i < ep->num_peers; i++) {
        mark_dead(ep->peers[i], "endpoint destroyed");
    }
    pthread_mutex_unlock(&ep->mu);
    for (size_t i = 0; i < ep->num_peers; i++) {
        peer *p = ep->peers[i];
        pthread_join(p->rx, NULL);
        if (!pthread_equal(p->tx, p->rx)) {
            pthread_join(p->tx, NULL);
        }
        pthread_cond_destroy(&p->tx_cv);
        free(p);
    }
    free(ep->peers);
    ep->peers = NULL;
    ep->num_peers = 0;
}
