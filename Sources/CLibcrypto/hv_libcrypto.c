// OpenSSL's libcrypto through dlopen (see hv_libcrypto.h for why). The prototypes come from
// OpenSSL's own headers (libssl-dev), so each pointer below has the type of the function it
// points to and the compiler checks every call; only the binding happens at run time.
#define _GNU_SOURCE
#include "hv_libcrypto.h"
#include <dlfcn.h>
#include <limits.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <pthread.h>
#include <stdio.h>

#define HV_FUNCTIONS(X) \
    X(EVP_CIPHER_CTX_new) X(EVP_CIPHER_CTX_free) X(EVP_CIPHER_CTX_ctrl) X(EVP_aes_256_gcm) \
    X(EVP_EncryptInit_ex) X(EVP_EncryptUpdate) X(EVP_EncryptFinal_ex) \
    X(EVP_DecryptInit_ex) X(EVP_DecryptUpdate) X(EVP_DecryptFinal_ex) \
    X(EVP_sha256) X(HMAC)

#define HV_POINTER(name) static __typeof__(&name) p_##name;
HV_FUNCTIONS(HV_POINTER)

static pthread_once_t once = PTHREAD_ONCE_INIT;
static char failure[256];

static void load(void) {
    // OpenSSL 3 (Debian 12 and later); 1.1 has every function used here with the same meaning.
    void *library = dlopen("libcrypto.so.3", RTLD_NOW | RTLD_LOCAL);
    if (!library) library = dlopen("libcrypto.so.1.1", RTLD_NOW | RTLD_LOCAL);
    if (!library) {
        snprintf(failure, sizeof failure, "the migration key needs OpenSSL's libcrypto (Debian: apt-get install libssl3): %s", dlerror());
        return;
    }
#define HV_RESOLVE(name) \
    if (!(p_##name = (__typeof__(&name))dlsym(library, #name))) { \
        snprintf(failure, sizeof failure, "OpenSSL's libcrypto lacks %s", #name); \
        return; \
    }
    HV_FUNCTIONS(HV_RESOLVE)
}

int hv_libcrypto_load(char *reason, size_t reason_size) {
    pthread_once(&once, load);
    if (failure[0]) {
        snprintf(reason, reason_size, "%s", failure);
        return -1;
    }
    return 0;
}

int hv_hmac_sha256(const uint8_t *key, size_t key_length, const uint8_t *data, size_t length, uint8_t out[32]) {
    if (failure[0] || !p_HMAC || key_length > INT_MAX) return -1;
    unsigned int written = 0;
    if (!p_HMAC(p_EVP_sha256(), key, (int)key_length, data, length, out, &written) || written != 32) return -1;
    return 0;
}

// One call of EVP_*Update may take at most INT_MAX bytes: feed longer input in pieces.
#define HV_PIECE (1 << 30)

int hv_aes256gcm_seal(const uint8_t key[32], const uint8_t nonce[12], const uint8_t *associated, size_t associated_length,
                      const uint8_t *input, size_t length, uint8_t *output) {
    if (failure[0] || !p_EVP_CIPHER_CTX_new || associated_length > INT_MAX) return -1;
    EVP_CIPHER_CTX *context = p_EVP_CIPHER_CTX_new();
    if (!context) return -1;
    int ok = 0, n = 0;
    if (p_EVP_EncryptInit_ex(context, p_EVP_aes_256_gcm(), NULL, NULL, NULL) != 1) goto done;
    if (p_EVP_CIPHER_CTX_ctrl(context, EVP_CTRL_GCM_SET_IVLEN, 12, NULL) != 1) goto done;
    if (p_EVP_EncryptInit_ex(context, NULL, NULL, key, nonce) != 1) goto done;
    if (associated_length && p_EVP_EncryptUpdate(context, NULL, &n, associated, (int)associated_length) != 1) goto done;
    size_t done_bytes = 0;
    while (done_bytes < length) {
        int piece = length - done_bytes > HV_PIECE ? HV_PIECE : (int)(length - done_bytes);
        if (p_EVP_EncryptUpdate(context, output + done_bytes, &n, input + done_bytes, piece) != 1 || n != piece) goto done;
        done_bytes += (size_t)piece;
    }
    if (p_EVP_EncryptFinal_ex(context, output + length, &n) != 1 || n != 0) goto done;
    if (p_EVP_CIPHER_CTX_ctrl(context, EVP_CTRL_GCM_GET_TAG, 16, output + length) != 1) goto done;
    ok = 1;
done:
    p_EVP_CIPHER_CTX_free(context);
    return ok ? 0 : -1;
}

int hv_aes256gcm_open(const uint8_t key[32], const uint8_t nonce[12], const uint8_t *associated, size_t associated_length,
                      const uint8_t *input, size_t length, uint8_t *output) {
    if (failure[0] || !p_EVP_CIPHER_CTX_new || length < 16 || associated_length > INT_MAX) return -1;
    size_t ciphertext = length - 16;
    EVP_CIPHER_CTX *context = p_EVP_CIPHER_CTX_new();
    if (!context) return -1;
    int ok = 0, n = 0;
    if (p_EVP_DecryptInit_ex(context, p_EVP_aes_256_gcm(), NULL, NULL, NULL) != 1) goto done;
    if (p_EVP_CIPHER_CTX_ctrl(context, EVP_CTRL_GCM_SET_IVLEN, 12, NULL) != 1) goto done;
    if (p_EVP_DecryptInit_ex(context, NULL, NULL, key, nonce) != 1) goto done;
    if (associated_length && p_EVP_DecryptUpdate(context, NULL, &n, associated, (int)associated_length) != 1) goto done;
    size_t done_bytes = 0;
    while (done_bytes < ciphertext) {
        int piece = ciphertext - done_bytes > HV_PIECE ? HV_PIECE : (int)(ciphertext - done_bytes);
        if (p_EVP_DecryptUpdate(context, output + done_bytes, &n, input + done_bytes, piece) != 1 || n != piece) goto done;
        done_bytes += (size_t)piece;
    }
    // The tag is an input here; OpenSSL's ctrl takes a non-const pointer but only reads it.
    if (p_EVP_CIPHER_CTX_ctrl(context, EVP_CTRL_GCM_SET_TAG, 16, (void *)(input + ciphertext)) != 1) goto done;
    if (p_EVP_DecryptFinal_ex(context, output + ciphertext, &n) != 1) goto done;
    ok = 1;
done:
    p_EVP_CIPHER_CTX_free(context);
    return ok ? 0 : -1;
}
