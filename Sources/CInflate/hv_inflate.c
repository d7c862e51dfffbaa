#include "hv_inflate.h"
#include <string.h>
#include <zlib.h>

int hv_inflate_raw(const void *input, size_t input_length, void *output, size_t output_length) {
    z_stream stream;
    memset(&stream, 0, sizeof stream);
    // -12: a raw deflate stream with a 4 KiB window, as QEMU writes compressed clusters.
    if (inflateInit2(&stream, -12) != Z_OK) return -1;
    stream.next_in = (Bytef *)input;
    stream.avail_in = (uInt)input_length;
    stream.next_out = (Bytef *)output;
    stream.avail_out = (uInt)output_length;
    int status = inflate(&stream, Z_FINISH);
    // The compressed data is padded to whole sectors, so input may remain; what counts is that
    // the cluster came out whole.
    int complete = (status == Z_STREAM_END || status == Z_OK || status == Z_BUF_ERROR) && stream.avail_out == 0;
    inflateEnd(&stream);
    return complete ? 0 : -1;
}
