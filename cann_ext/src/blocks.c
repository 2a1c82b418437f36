/* Host-side KV block copies: gather paged blocks into one contiguous buffer, scatter it back. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* a * b, or 0 with *overflow set. */
static uint64_t mul(uint64_t a, uint64_t b, int *overflow) {
    if (a != 0 && b > UINT64_MAX / a) {
        *overflow = 1;
        return 0;
    }
    return a * b;
}

static uint64_t add(uint64_t a, uint64_t b, int *overflow) {
    if (b > UINT64_MAX - a) {
        *overflow = 1;
        return 0;
    }
    return a + b;
}

static cx_status check_layout(const char *fn, const cx_block_layout *l, uint64_t paged_bytes) {
    if (l->num_planes == 0 || l->num_blocks == 0 || l->block_bytes == 0) {
        return cx_fail(CX_ERR_INVALID_ARG, "%s: num_planes, num_blocks and block_bytes must be > 0",
                       fn);
    }
    /* Byte just past the last block of the last plane. */
    int overflow = 0;
    uint64_t end = add(mul(l->num_planes - 1, l->plane_stride, &overflow),
                       mul(l->num_blocks - 1, l->block_stride, &overflow), &overflow);
    end = add(end, l->block_bytes, &overflow);
    if (overflow || end > paged_bytes) {
        return cx_fail(CX_ERR_OUT_OF_RANGE,
                       "%s: the layout reaches past the paged buffer (%llu bytes)", fn,
                       (unsigned long long)paged_bytes);
    }
    return CX_OK;
}

static cx_status check_ids(const char *fn, const int64_t *ids, uint64_t n, uint64_t num_blocks,
                           int unique) {
    for (uint64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || (uint64_t)ids[i] >= num_blocks) {
            return cx_fail(CX_ERR_OUT_OF_RANGE, "%s: block_ids[%llu] = %lld is outside [0, %llu)",
                           fn, (unsigned long long)i, (long long)ids[i],
                           (unsigned long long)num_blocks);
        }
    }
    if (!unique || n < 2) {
        return CX_OK;
    }
    unsigned char *seen = calloc((size_t)(num_blocks / 8 + 1), 1);
    if (seen == NULL) {
        return cx_fail(CX_ERR_NO_MEMORY, "%s: out of memory", fn);
    }
    cx_status st = CX_OK;
    for (uint64_t i = 0; i < n && st == CX_OK; i++) {
        uint64_t b = (uint64_t)ids[i];
        if (seen[b / 8] & (1u << (b % 8))) {
            st = cx_fail(CX_ERR_INVALID_ARG, "%s: block id %llu repeats (block_ids[%llu])", fn,
                         (unsigned long long)b, (unsigned long long)i);
        }
        seen[b / 8] |= (unsigned char)(1u << (b % 8));
    }
    free(seen);
    return st;
}

/* Every check both directions share; on success *contig_needed is the contiguous size. */
static cx_status check_args(const char *fn, const void *paged, uint64_t paged_bytes,
                            const cx_block_layout *l, const int64_t *ids, uint64_t n,
                            const void *contig, uint64_t contig_bytes, int unique) {
    if (paged == NULL || l == NULL || (n > 0 && ids == NULL) ||
        (contig_bytes > 0 && contig == NULL)) {
        return cx_fail(CX_ERR_INVALID_ARG, "%s: NULL buffer, layout or block_ids", fn);
    }
    cx_status st = check_layout(fn, l, paged_bytes);
    if (st != CX_OK) {
        return st;
    }
    int overflow = 0;
    uint64_t need = mul(mul(l->num_planes, n, &overflow), l->block_bytes, &overflow);
    if (overflow || need != contig_bytes) {
        return cx_fail(CX_ERR_OUT_OF_RANGE,
                       "%s: contiguous buffer has %llu bytes, the blocks need %llu", fn,
                       (unsigned long long)contig_bytes, (unsigned long long)need);
    }
    uintptr_t p = (uintptr_t)paged, c = (uintptr_t)contig;
    if (contig_bytes > 0 && p < c + contig_bytes && c < p + paged_bytes) {
        return cx_fail(CX_ERR_INVALID_ARG, "%s: the paged and contiguous buffers overlap", fn);
    }
    return check_ids(fn, ids, n, l->num_blocks, unique);
}

cx_status cx_gather_blocks(const void *paged, uint64_t paged_bytes, const cx_block_layout *layout,
                           const int64_t *block_ids, uint64_t num_ids, void *contig,
                           uint64_t contig_bytes) {
    cx_status st = check_args("cx_gather_blocks", paged, paged_bytes, layout, block_ids, num_ids,
                              contig, contig_bytes, 0);
    if (st != CX_OK) {
        return st;
    }
    const unsigned char *src = paged;
    unsigned char *dst = contig;
    for (uint64_t p = 0; p < layout->num_planes; p++) {
        const unsigned char *plane = src + p * layout->plane_stride;
        for (uint64_t i = 0; i < num_ids; i++) {
            memcpy(dst, plane + (uint64_t)block_ids[i] * layout->block_stride, layout->block_bytes);
            dst += layout->block_bytes;
        }
    }
    return cx_ok();
}

cx_status cx_scatter_blocks(void *paged, uint64_t paged_bytes, const cx_block_layout *layout,
                            const int64_t *block_ids, uint64_t num_ids, const void *contig,
                            uint64_t contig_bytes) {
    cx_status st = check_args("cx_scatter_blocks", paged, paged_bytes, layout, block_ids, num_ids,
                              contig, contig_bytes, 1);
    if (st != CX_OK) {
        return st;
    }
    unsigned char *dst = paged;
    const unsigned char *src = contig;
    for (uint64_t p = 0; p < layout->num_planes; p++) {
        unsigned char *plane = dst + p * layout->plane_stride;
        for (uint64_t i = 0; i < num_ids; i++) {
            memcpy(plane + (uint64_t)block_ids[i] * layout->block_stride, src, layout->block_bytes);
            src += layout->block_bytes;
        }
    }
    return cx_ok();
}
