/* Host TCP connection set-up: listening, connection ids, the HELLO handshake, connect/accept.
 *
 * Lifecycle of the listening side:
 *   1. cx_endpoint_conn_id binds config.bind_address, listens and starts the acceptor thread;
 *   2. the acceptor greets each incoming socket (HELLO, checking the endpoint nonce the
 *      connector read from the connection id), starts a peer for it and queues its cx_peer;
 *   3. cx_endpoint_accept hands queued peers out;
 *   4. cx_endpoint_destroy shuts the listening socket, which ends the acceptor.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "internal.h"

#define CONN_ID_PREFIX "cx-tcp/1"
/* The acceptor waits at most this long for a connector's HELLO (a stray client stalls it). */
#define HELLO_TIMEOUT_MS 5000u

static cx_status parse_bind(const char *bind, char ip[64], uint16_t *port) {
    const char *colon = strrchr(bind, ':');
    char *end = NULL;
    unsigned long value = colon ? strtoul(colon + 1, &end, 10) : 0;
    size_t ip_len = colon ? (size_t)(colon - bind) : 0;
    if (colon == NULL || *end != '\0' || end == colon + 1 || value > 65535 || ip_len == 0 ||
        ip_len >= 64) {
        return cx_fail(CX_ERR_INVALID_ARG, "bind_address %s is not \"ipv4:port\"", bind);
    }
    memcpy(ip, bind, ip_len);
    ip[ip_len] = '\0';
    struct in_addr addr;
    if (inet_pton(AF_INET, ip, &addr) != 1) {
        return cx_fail(CX_ERR_INVALID_ARG, "bind_address %s: %s is not an IPv4 address", bind, ip);
    }
    if (addr.s_addr == htonl(INADDR_ANY)) {
        return cx_fail(CX_ERR_INVALID_ARG,
                       "bind_address %s: bind the address peers should dial, not 0.0.0.0 (the "
                       "connection id must name a reachable address)", bind);
    }
    *port = (uint16_t)value;
    return CX_OK;
}

static cx_status open_listener(cx_endpoint *ep, const char *ip, uint16_t port) {
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    inet_pton(AF_INET, ip, &addr.sin_addr);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return cx_fail(CX_ERR_CONNECTION, "socket: %s", strerror(errno));
    }
    int one = 1;
    (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    cx_tune_socket(fd); /* accepted sockets inherit the buffer sizes before their SYN-ACK */
    socklen_t len = sizeof addr;
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, 128) != 0 ||
        getsockname(fd, (struct sockaddr *)&addr, &len) != 0) {
        int err = errno;
        close(fd);
        return cx_fail(CX_ERR_CONNECTION, "listen on %s:%u: %s", ip, port, strerror(err));
    }
    ep->listen_fd = fd;
    ep->conn_id_len = (size_t)snprintf(ep->conn_id, sizeof ep->conn_id, "%s %s %u %016" PRIx64,
                                       CONN_ID_PREFIX, ip, ntohs(addr.sin_port), ep->nonce);
    return CX_OK;
}

/* Sends our HELLO; `expect` is the nonce we believe the other side has (0 when answering). */
static int send_hello(int fd, uint64_t nonce, uint64_t expect, cx_status status) {
    wire_hdr h = {W_HELLO, nonce, 0, (uint32_t)status, expect, 0};
    uint8_t buf[CX_WIRE_HDR_BYTES];
    cx_wire_encode(&h, buf);
    struct iovec iov = {buf, sizeof buf};
    return cx_send_iov(fd, &iov, 1);
}

/* Reads one HELLO within timeout_ms; 0 on success, else errno (EPROTO: not a HELLO). */
static int recv_hello(int fd, uint32_t timeout_ms, wire_hdr *h) {
    uint8_t buf[CX_WIRE_HDR_BYTES];
    char why[128];
    int err = 0;
    cx_set_recv_timeout(fd, timeout_ms);
    uint64_t got = cx_recv_exact(fd, buf, sizeof buf, &err);
    cx_set_recv_timeout(fd, CX_TIMEOUT_INFINITE);
    if (got < sizeof buf) {
        return err ? err : ECONNRESET;
    }
    if (cx_wire_decode(buf, h, why, sizeof why) != 0 || h->op != W_HELLO) {
        return EPROTO;
    }
    return 0;
}

/* Acceptor side of the handshake; 0 and the connector's nonce on success. */
static int greet_incoming(cx_endpoint *ep, int fd, uint64_t *remote_nonce) {
    wire_hdr h;
    uint32_t timeout = ep->timeout_ms < HELLO_TIMEOUT_MS ? ep->timeout_ms : HELLO_TIMEOUT_MS;
    if (recv_hello(fd, timeout, &h) != 0) {
        return -1;
    }
    cx_status st = h.offset == ep->nonce ? CX_OK : CX_ERR_NOT_FOUND;
    if (send_hello(fd, ep->nonce, 0, st) != 0 || st != CX_OK) {
        return -1;
    }
    *remote_nonce = h.id;
    return 0;
}

static void queue_accepted(cx_endpoint *ep, int fd, uint64_t remote_nonce) {
    cx_peer id = 0;
    pthread_mutex_lock(&ep->mu);
    if (ep->closing || cx_grow((void **)&ep->accepted, &ep->cap_accepted, ep->num_accepted + 1,
                               sizeof *ep->accepted) != 0 ||
        cx_peer_start(ep, fd, remote_nonce, &id) != CX_OK) {
        close(fd);
    } else {
        ep->accepted[ep->num_accepted++] = id;
        pthread_cond_broadcast(&ep->cv);
    }
    pthread_mutex_unlock(&ep->mu);
}

static void *acceptor_main(void *arg) {
    cx_endpoint *ep = arg;
    for (;;) {
        int fd = accept4(ep->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE) {
                continue;
            }
            return NULL; /* EINVAL after shutdown(): the endpoint is closing */
        }
        uint64_t remote_nonce = 0;
        if (greet_incoming(ep, fd, &remote_nonce) != 0) {
            close(fd); /* a stray or stale connector; the endpoint carries on */
            continue;
        }
        queue_accepted(ep, fd, remote_nonce);
    }
}

static cx_status start_listening(cx_endpoint *ep) {
    char ip[64];
    uint16_t port = 0;
    cx_status st = parse_bind(ep->bind_address, ip, &port);
    if (st == CX_OK) {
        st = open_listener(ep, ip, port);
    }
    if (st != CX_OK) {
        return st;
    }
    if (pthread_create(&ep->acceptor, NULL, acceptor_main, ep) != 0) {
        close(ep->listen_fd);
        ep->listen_fd = -1;
        return cx_fail(CX_ERR_NO_MEMORY, "cx_endpoint_conn_id: cannot start the acceptor thread");
    }
    ep->acceptor_started = true;
    return CX_OK;
}

cx_status cx_endpoint_conn_id(cx_endpoint *ep, void *buf, size_t cap, size_t *len) {
    if (ep == NULL || buf == NULL || len == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_endpoint_conn_id: arguments must not be NULL");
    }
    pthread_mutex_lock(&ep->mu);
    cx_status st = ep->acceptor_started ? CX_OK : start_listening(ep);
    if (st == CX_OK && cap < ep->conn_id_len) {
        st = cx_fail(CX_ERR_INVALID_ARG, "cx_endpoint_conn_id: buffer of %zu bytes, need %zu",
                     cap, ep->conn_id_len);
    }
    if (st == CX_OK) {
        memcpy(buf, ep->conn_id, ep->conn_id_len);
        *len = ep->conn_id_len;
    }
    pthread_mutex_unlock(&ep->mu);
    return st == CX_OK ? cx_ok() : st;
}

static cx_status parse_conn_id(const void *conn_id, size_t len, char ip[64], uint16_t *port,
                               uint64_t *nonce) {
    char text[128];
    unsigned int p = 0;
    if (len == 0 || len >= sizeof text) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_endpoint_connect: connection id of %zu bytes", len);
    }
    memcpy(text, conn_id, len);
    text[len] = '\0';
    char tail;
    if (sscanf(text, CONN_ID_PREFIX " %63s %u %" SCNx64 "%c", ip, &p, nonce, &tail) != 3 ||
        p == 0 || p > 65535) {
        return cx_fail(CX_ERR_INVALID_ARG,
                       "cx_endpoint_connect: \"%s\" is not a host TCP connection id", text);
    }
    *port = (uint16_t)p;
    return CX_OK;
}

/* Connector side of the handshake. */
static cx_status greet_outgoing(cx_endpoint *ep, int fd, uint64_t expect, uint32_t timeout_ms,
                                const char *where) {
    wire_hdr h;
    int err = send_hello(fd, ep->nonce, expect, CX_OK);
    if (err == 0) {
        err = recv_hello(fd, timeout_ms, &h);
    }
    if (err == EAGAIN || err == EWOULDBLOCK) {
        return cx_fail(CX_ERR_TIMEOUT, "cx_endpoint_connect: %s did not answer HELLO in %u ms",
                       where, timeout_ms);
    }
    if (err != 0) {
        return cx_fail(CX_ERR_CONNECTION, "cx_endpoint_connect: handshake with %s failed: %s",
                       where, strerror(err));
    }
    if (h.status != CX_OK) {
        return cx_fail(CX_ERR_CONNECTION,
                       "cx_endpoint_connect: %s refused: its endpoint nonce is not %016" PRIx64
                       " (a stale connection id?)", where, expect);
    }
    return CX_OK;
}

cx_status cx_endpoint_connect(cx_endpoint *ep, const void *conn_id, size_t len,
                              uint32_t timeout_ms, cx_peer *peer) {
    if (ep == NULL || conn_id == NULL || peer == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_endpoint_connect: arguments must not be NULL");
    }
    char ip[64], where[96];
    uint16_t port = 0;
    uint64_t nonce = 0;
    cx_status st = parse_conn_id(conn_id, len, ip, &port, &nonce);
    if (st != CX_OK) {
        return st;
    }
    snprintf(where, sizeof where, "%s:%u", ip, port);
    int err = 0;
    int fd = cx_connect_tcp(ip, port, timeout_ms, &err);
    if (fd < 0) {
        return cx_fail(err == ETIMEDOUT ? CX_ERR_TIMEOUT : CX_ERR_CONNECTION,
                       "cx_endpoint_connect: connect to %s: %s", where, strerror(err));
    }
    st = greet_outgoing(ep, fd, nonce, timeout_ms, where);
    if (st == CX_OK) {
        pthread_mutex_lock(&ep->mu);
        st = cx_peer_start(ep, fd, nonce, peer);
        pthread_mutex_unlock(&ep->mu);
    }
    if (st != CX_OK) {
        close(fd);
        return st;
    }
    return cx_ok();
}

cx_status cx_endpoint_accept(cx_endpoint *ep, uint32_t timeout_ms, cx_peer *peer) {
    if (ep == NULL || peer == NULL) {
        return cx_fail(CX_ERR_INVALID_ARG, "cx_endpoint_accept: arguments must not be NULL");
    }
    struct timespec deadline = cx_deadline(timeout_ms);
    pthread_mutex_lock(&ep->mu);
    cx_status st = CX_OK;
    if (!ep->acceptor_started) {
        st = cx_fail(CX_ERR_INVALID_ARG,
                     "cx_endpoint_accept: not listening; call cx_endpoint_conn_id first");
    }
    while (st == CX_OK && ep->num_accepted == 0) {
        if (cx_cond_wait(&ep->cv, &ep->mu, timeout_ms, &deadline) == ETIMEDOUT) {
            st = cx_fail(CX_ERR_TIMEOUT, "cx_endpoint_accept: no connection within %u ms",
                         timeout_ms);
        }
    }
    if (st == CX_OK) {
        *peer = ep->accepted[0];
        memmove(ep->accepted, ep->accepted + 1, --ep->num_accepted * sizeof *ep->accepted);
    }
    pthread_mutex_unlock(&ep->mu);
    return st == CX_OK ? cx_ok() : st;
}

void cx_listener_stop(cx_endpoint *ep) {
    if (!ep->acceptor_started) {
        return;
    }
    shutdown(ep->listen_fd, SHUT_RDWR); /* wakes accept() with EINVAL */
    pthread_join(ep->acceptor, NULL);
    close(ep->listen_fd);
    ep->listen_fd = -1;
    ep->acceptor_started = false;
}
