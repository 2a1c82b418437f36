/* Host TCP wire header encoding and the blocking socket I/O the backend threads use. */
#include "wire.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "cann_ext.h"

/* Larger than the loopback/LAN bandwidth-delay product; the kernel caps it at rmem_max. */
#define SOCKET_BUFFER_BYTES (4 << 20)
/* Bytes per recv()/sendmsg() call: large transfers stream in chunks of this size. */
#define IO_CHUNK_BYTES ((uint64_t)16 << 20)

void cx_put_u16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

void cx_put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}

void cx_put_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}

uint16_t cx_get_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

uint32_t cx_get_u32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) {
        v = (v << 8) | p[i];
    }
    return v;
}

uint64_t cx_get_u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) {
        v = (v << 8) | p[i];
    }
    return v;
}

void cx_wire_encode(const wire_hdr *h, uint8_t out[CX_WIRE_HDR_BYTES]) {
    cx_put_u32(out, CX_WIRE_MAGIC);
    cx_put_u16(out + 4, CX_WIRE_VERSION);
    cx_put_u16(out + 6, h->op);
    cx_put_u64(out + 8, h->id);
    cx_put_u32(out + 16, h->handle);
    cx_put_u32(out + 20, h->status);
    cx_put_u64(out + 24, h->offset);
    cx_put_u64(out + 32, h->length);
}

int cx_wire_decode(const uint8_t in[CX_WIRE_HDR_BYTES], wire_hdr *h, char *err, size_t cap) {
    uint32_t magic = cx_get_u32(in);
    uint16_t version = cx_get_u16(in + 4);
    if (magic != CX_WIRE_MAGIC || version != CX_WIRE_VERSION) {
        snprintf(err, cap, "bad wire header: magic 0x%08x version %u (want 0x%08x version %d)",
                 magic, version, CX_WIRE_MAGIC, CX_WIRE_VERSION);
        return -1;
    }
    h->op = cx_get_u16(in + 6);
    h->id = cx_get_u64(in + 8);
    h->handle = cx_get_u32(in + 16);
    h->status = cx_get_u32(in + 20);
    h->offset = cx_get_u64(in + 24);
    h->length = cx_get_u64(in + 32);
    return 0;
}

uint64_t cx_recv_exact(int fd, void *buf, uint64_t len, int *err) {
    uint8_t *p = buf;
    uint64_t got = 0;
    *err = 0;
    while (got < len) {
        uint64_t want = len - got < IO_CHUNK_BYTES ? len - got : IO_CHUNK_BYTES;
        ssize_t n = recv(fd, p + got, (size_t)want, 0);
        if (n > 0) {
            got += (uint64_t)n;
        } else if (n == 0) {
            return got; /* EOF: *err stays 0 */
        } else if (errno != EINTR) {
            *err = errno;
            return got;
        }
    }
    return got;
}

uint64_t cx_recv_drop(int fd, uint64_t len, int *err) {
    uint8_t scratch[64 * 1024];
    uint64_t got = 0;
    *err = 0;
    while (got < len) {
        uint64_t want = len - got < sizeof scratch ? len - got : sizeof scratch;
        uint64_t n = cx_recv_exact(fd, scratch, want, err);
        got += n;
        if (n < want) {
            return got;
        }
    }
    return got;
}

/* Drops `sent` bytes from the front of the iovec list; returns the new first index. */
static int advance(struct iovec *iov, int n, int first, size_t sent) {
    while (first < n && sent >= iov[first].iov_len) {
        sent -= iov[first].iov_len;
        first++;
    }
    if (first < n) {
        iov[first].iov_base = (uint8_t *)iov[first].iov_base + sent;
        iov[first].iov_len -= sent;
    }
    return first;
}

int cx_send_iov(int fd, struct iovec *iov, int n) {
    int first = advance(iov, n, 0, 0); /* skip empty entries */
    while (first < n) {
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov + first;
        msg.msg_iovlen = (size_t)(n - first);
        ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) {
                continue;
            }
            return errno;
        }
        first = advance(iov, n, first, (size_t)sent);
    }
    return 0;
}

void cx_tune_socket(int fd) {
    /* Best effort: a refused option costs speed, not correctness. */
    int one = 1, size = SOCKET_BUFFER_BYTES;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    /* A peer host that vanishes without FIN/RST is noticed within about 30 s. */
    int idle = 10, interval = 5, count = 4;
    (void)setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    (void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
    (void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
    (void)setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count);
}

void cx_set_recv_timeout(int fd, uint32_t timeout_ms) {
    struct timeval tv = {0, 0};
    if (timeout_ms != CX_TIMEOUT_INFINITE) {
        tv.tv_sec = timeout_ms / 1000;
        tv.tv_usec = (timeout_ms % 1000) * 1000;
        if (timeout_ms == 0) {
            tv.tv_usec = 1000; /* 0 would mean "no timeout" to the kernel */
        }
    }
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
}

/* Waits for a non-blocking connect to finish; 0 or errno. */
static int finish_connect(int fd, uint32_t timeout_ms) {
    struct pollfd pfd = {fd, POLLOUT, 0};
    int wait_ms = timeout_ms == CX_TIMEOUT_INFINITE ? -1 : (int)(timeout_ms > INT32_MAX
                                                                 ? INT32_MAX : timeout_ms);
    int ready;
    do {
        ready = poll(&pfd, 1, wait_ms);
    } while (ready < 0 && errno == EINTR);
    if (ready == 0) {
        return ETIMEDOUT;
    }
    if (ready < 0) {
        return errno;
    }
    int so_error = 0;
    socklen_t len = sizeof so_error;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &so_error, &len) != 0) {
        return errno;
    }
    return so_error;
}

int cx_connect_tcp(const char *ip, uint16_t port, uint32_t timeout_ms, int *err) {
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    if (inet_pton(AF_INET, ip, &addr.sin_addr) != 1) {
        *err = EINVAL;
        return -1;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        *err = errno;
        return -1;
    }
    cx_tune_socket(fd); /* before connect, so the window scale covers the big buffers */
    int rc = connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0 ? 0 : errno;
    if (rc == EINPROGRESS) {
        rc = finish_connect(fd, timeout_ms);
    }
    if (rc == 0 && fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) != 0) {
        rc = errno;
    }
    if (rc != 0) {
        close(fd);
        *err = rc;
        return -1;
    }
    return fd;
}
