#ifndef HV_LIBCRYPTO_H
#define HV_LIBCRYPTO_H
#include <stddef.h>
#include <stdint.h>

// The three primitives the migration stream's shared key needs, from the host's OpenSSL
// (libcrypto.so.3, Debian's libssl3: its security updates reach hv without a rebuild). The
// library is loaded with dlopen on first use, not linked: every hvctl and every VM's core would
// otherwise pay for mapping and relocating it at start, while only a migration uses it.

// Loads libcrypto and resolves what the functions below call. Returns 0, or -1 with a one-line
// reason in `reason` (the library or a symbol is missing). Safe to call from any thread, any
// number of times.
int hv_libcrypto_load(char *reason, size_t reason_size);

// HMAC-SHA256 of `data` under `key` into `out` (32 bytes). Returns 0, or -1.
int hv_hmac_sha256(const uint8_t *key, size_t key_length, const uint8_t *data, size_t length, uint8_t out[32]);

// AES-256-GCM with a 12-byte nonce: `output` gets `length` bytes of ciphertext, then the 16-byte
// tag over it and the `associated` bytes. `output` may be `input` (in place). Returns 0, or -1.
int hv_aes256gcm_seal(const uint8_t key[32], const uint8_t nonce[12], const uint8_t *associated, size_t associated_length,
                      const uint8_t *input, size_t length, uint8_t *output);

// The inverse: `input` is ciphertext and tag (`length` counts both, at least 16); `output` gets
// `length - 16` bytes (`output` may be `input`). Returns 0, or -1 when the tag does not match
// (nothing in `output` may then be used).
int hv_aes256gcm_open(const uint8_t key[32], const uint8_t nonce[12], const uint8_t *associated, size_t associated_length,
                      const uint8_t *input, size_t length, uint8_t *output);

#endif
