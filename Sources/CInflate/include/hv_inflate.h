#ifndef HV_INFLATE_H
#define HV_INFLATE_H
#include <stddef.h>

// Inflates `input` (raw deflate, no zlib or gzip header: what qcow2 stores in a compressed
// cluster) into exactly `output_length` bytes of `output`. Returns 0 when the stream produced
// all of them, -1 otherwise (corrupt or short data). In C because zlib's inflateInit2 is a
// macro Swift cannot call; zlib only ever writes within `output`.
int hv_inflate_raw(const void *input, size_t input_length, void *output, size_t output_length);

#endif
