/* Private helpers shared by the cann_ext sources. */
#ifndef CANN_EXT_INTERNAL_H
#define CANN_EXT_INTERNAL_H

#include "cann_ext.h"

#if defined(__GNUC__)
#define CX_PRINTF(fmt_index, first_arg) __attribute__((format(printf, fmt_index, first_arg)))
#else
#define CX_PRINTF(fmt_index, first_arg)
#endif

/* Records a detail message for the calling thread and returns `status`. */
cx_status cx_fail(cx_status status, const char *fmt, ...) CX_PRINTF(2, 3);
/* Clears the calling thread's detail message and returns CX_OK. */
cx_status cx_ok(void);
/* The "not built yet" answer of every network function in the host-only build. */
cx_status cx_not_built(const char *function);

#endif /* CANN_EXT_INTERNAL_H */
