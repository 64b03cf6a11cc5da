/* C version of prefork_sessions._pager.Pager: the store's hot path (hashing,
 * slot probing and the lock-free seqlock read).  It implements exactly the
 * format and rules of _layout.py and the algorithm of _pager.py, which remains
 * the reference and the fallback when this module cannot be built.
 *
 * Seqlock: the page's seq is loaded with acquire ordering before and after the
 * entry is copied, so the copy is validated on every CPU architecture. */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE  /* qsort_r */
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <pthread.h>
#include <time.h>
#include <math.h>
#include <zlib.h>

/* _layout's constants; LAYOUT (below) exports them and a test asserts they equal _layout's */
#define HEADER_SIZE 4096
#define OFF_LOCK 0       /* the page's robust mutex (_locks) */
#define LOCK_SIZE 64
#define OFF_SEQ 64
#define OFF_COUNTS 72    /* entries, used, bump, dead follow seq */
#define OFF_ENTRIES 72
#define OFF_USED 76
#define OFF_BUMP 80
#define OFF_DEADBYTES 84
#define PAGE_HDR_SIZE 128
#define SLOT_SHIFT 3
#define ENTRY_SIZE 24
#define ENTRY_CRC_SPAN 19
#define OFF_E_HASH 8
#define OFF_E_VLEN 12
#define OFF_E_KLEN 16
#define OFF_E_FLAGS 18
#define OFF_DEAD 19
#define OFF_E_CRC 20
#define SLOT_EMPTY 0
#define SLOT_TOMB 1
#define SLOT_TICK 4      /* a slot: entry offset, then the last-access tick */
#define OFF_EVICTIONS 88 /* evictions, expirations, recoveries: u64 each */
#define FLAG_STR_KEY 1
#define MAX_KEY_SIZE 0xFFFF  /* _args.MAX_KEY_SIZE */
#define SPARE_STATE_OFF 2048  /* state, target, end, crc32: u32 each */
#define OFF_SPARE_TARGET 2052
#define OFF_SPARE_END 2056
#define OFF_SPARE_CRC 2060
#define SPARE_EMPTY 0
#define SPARE_VALID 1
#define HOLDER_CHECK_AFTER 0.05  /* _locks.HOLDER_CHECK_AFTER */
#define INSERT_BACKOFF_US 50     /* _pager.INSERT_BACKOFF */
#define MAX_BACKOFFS 20          /* _pager.MAX_BACKOFFS */
#define DAMAGED (-1)     /* the entry offset find() returns for a failed check */
#define FIB 0x9E3779B1u  /* _layout.FIB */
#define READ_TRIES 4     /* _pager.READ_TRIES */
/* _locks.Locked */
#define LOCK_SOUND 0
#define LOCK_DIRTY 1
#define LOCK_TIMEOUT 2
#define LOCK_WEDGED 3

_Static_assert(sizeof(pthread_mutex_t) <= LOCK_SIZE, "a page header has no room for this pthread_mutex_t");

/* ------------------------------------------------------------------ checksums
 * The format's checksum is zlib's crc32 (Python's zlib.crc32 computes the same in
 * the reference).  zlib's table code costs ~0.7 ns a byte here, 0.7 us for a 1 KiB
 * value, read and written: most of a get.  On x86-64 with PCLMULQDQ the bulk of a
 * buffer is folded with carry-less multiplication instead (Gopal et al., "Fast CRC
 * Computation for Generic Polynomials Using PCLMULQDQ", Intel 2009: fold four 128-bit
 * lanes by 512 bits, then one lane by 128, reduce to 64 and Barrett-reduce to 32,
 * with the bit-reflected constants for the gzip polynomial given there); the tail
 * under 16 bytes (and a buffer under FOLD_MIN) goes through zlib.  Same result, ~15x faster; a test compares it
 * with zlib.crc32 on every length and alignment up to a few KiB. */
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FOLD_MIN 32  /* shorter: zlib's table is as quick as the reduction */

__attribute__((target("pclmul,sse4.1")))
static uint32_t crc_fold(uint32_t crc, const unsigned char *p, size_t n) {
    /* n >= 16 and a multiple of 16; crc is the running (not inverted) register */
    const __m128i k512 = _mm_set_epi64x(0x01c6e41596LL, 0x0154442bd4LL);  /* x^(512+-32/64) mod P */
    const __m128i k128 = _mm_set_epi64x(0x00ccaa009eLL, 0x01751997d0LL);  /* x^(128+-32/64) mod P */
    const __m128i k64 = _mm_set_epi64x(0, 0x0163cd6124LL);
    const __m128i barrett = _mm_set_epi64x(0x01f7011641LL, 0x01db710641LL); /* mu, P */
    const __m128i low32 = _mm_setr_epi32(~0, 0, ~0, 0);
    __m128i a = _mm_xor_si128(_mm_loadu_si128((const __m128i *)p), _mm_cvtsi32_si128((int)crc));
    p += 16; n -= 16;
    if (n >= 48) {  /* four lanes, each folded 512 bits ahead, then into one */
        __m128i b = _mm_loadu_si128((const __m128i *)p);
        __m128i c = _mm_loadu_si128((const __m128i *)(p + 16));
        __m128i d = _mm_loadu_si128((const __m128i *)(p + 32));
        p += 48; n -= 48;
        for (; n >= 64; p += 64, n -= 64) {
            __m128i a0 = _mm_clmulepi64_si128(a, k512, 0x00), b0 = _mm_clmulepi64_si128(b, k512, 0x00);
            __m128i c0 = _mm_clmulepi64_si128(c, k512, 0x00), d0 = _mm_clmulepi64_si128(d, k512, 0x00);
            a = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(a, k512, 0x11), a0), _mm_loadu_si128((const __m128i *)p));
            b = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(b, k512, 0x11), b0), _mm_loadu_si128((const __m128i *)(p + 16)));
            c = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(c, k512, 0x11), c0), _mm_loadu_si128((const __m128i *)(p + 32)));
            d = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(d, k512, 0x11), d0), _mm_loadu_si128((const __m128i *)(p + 48)));
        }
        a = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(a, k128, 0x11), _mm_clmulepi64_si128(a, k128, 0x00)), b);
        a = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(a, k128, 0x11), _mm_clmulepi64_si128(a, k128, 0x00)), c);
        a = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(a, k128, 0x11), _mm_clmulepi64_si128(a, k128, 0x00)), d);
    }
    for (; n >= 16; p += 16, n -= 16)  /* one lane, 128 bits at a time */
        a = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(a, k128, 0x11), _mm_clmulepi64_si128(a, k128, 0x00)),
                          _mm_loadu_si128((const __m128i *)p));
    /* 128 -> 64 bits, 64 -> 32 bits, then Barrett reduction */
    a = _mm_xor_si128(_mm_srli_si128(a, 8), _mm_clmulepi64_si128(a, k128, 0x10));
    a = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(a, low32), k64, 0x00), _mm_srli_si128(a, 4));
    __m128i t = _mm_clmulepi64_si128(_mm_and_si128(a, low32), barrett, 0x10);
    t = _mm_clmulepi64_si128(_mm_and_si128(t, low32), barrett, 0x00);
    return (uint32_t)_mm_extract_epi32(_mm_xor_si128(a, t), 1);
}

static int have_pclmul;

/* zlib.crc32(data, crc) */
static inline uint32_t crc32_of(uint32_t crc, const void *buf, size_t n) {
    const unsigned char *p = buf;
    if (have_pclmul && n >= FOLD_MIN) {
        size_t bulk = n & ~(size_t)15;
        crc = ~crc_fold(~crc, p, bulk);
        p += bulk; n -= bulk;
    }
    return (uint32_t)crc32(crc, p, (uInt)n);
}

static void detect_cpu(void) {
    __builtin_cpu_init();
    have_pclmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
}
#else
static inline uint32_t crc32_of(uint32_t crc, const void *buf, size_t n) {
    return (uint32_t)crc32(crc, (const Bytef *)buf, (uInt)n);
}

static void detect_cpu(void) {}
#endif

static PyObject *speedups_crc32(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer b;
    unsigned long crc = 0;
    if (nargs < 1 || nargs > 2 || (nargs == 2 && ((crc = PyLong_AsUnsignedLong(args[1])) == (unsigned long)-1
                                                  && PyErr_Occurred()))) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "crc32(data, value=0)");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &b, PyBUF_SIMPLE) < 0) return NULL;
    uint32_t r = crc32_of((uint32_t)crc, b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLong(r);
}

typedef struct {
    PyObject_HEAD
    Py_buffer view;      /* the writable mapping; held until close() */
    int have_view;
    uint32_t seed;
    Py_ssize_t npages, page_size, nslots, max_used, d0;
    PyObject *host;      /* _upkeep.Host: errors to raise, damaged locks to reset */
    double timeout;      /* lock_timeout, seconds */
    PyObject *tracer;    /* None, or told the steps of page rewrites (_upkeep.Step) */
    PyObject *busy;      /* _pager.BUSY: what read() returns when writers kept the pages busy */
    int nfixed;          /* words of an unlocked mutex that locking never changes (_locks.fixed_words) */
    uint32_t fixed_at[LOCK_SIZE / 4], fixed[LOCK_SIZE / 4];
} Pager;

typedef struct {
    double expire_at;
    uint32_t hash, vlen;
    uint16_t klen;
    uint8_t flags, dead;
    uint32_t crc;
} Entry;

/* last-access clock for LRU: 1/16 s units, wrapping (see _layout.tick) */
static inline uint32_t tick(const struct timespec *ts) {
    return (uint32_t)((uint64_t)ts->tv_sec * 16u + (uint64_t)ts->tv_nsec / 62500000u);
}

static inline uint64_t load_seq(const char *p) {
    return __atomic_load_n((const uint64_t *)p, __ATOMIC_ACQUIRE);
}

static inline void read_entry(const char *p, Entry *e) {
    memcpy(&e->expire_at, p, 8);
    memcpy(&e->hash, p + OFF_E_HASH, 4);
    memcpy(&e->vlen, p + OFF_E_VLEN, 4);
    memcpy(&e->klen, p + OFF_E_KLEN, 2);
    e->flags = (uint8_t)p[OFF_E_FLAGS];
    e->dead = (uint8_t)p[OFF_DEAD];
    memcpy(&e->crc, p + OFF_E_CRC, 4);
}

/* a key's two candidate pages from its hash: _layout.pages_of */
static inline void pages_of(Pager *self, uint32_t hh, Py_ssize_t *p1, Py_ssize_t *p2) {
    Py_ssize_t n = self->npages;
    *p1 = (Py_ssize_t)(hh % (uint64_t)n);
    *p2 = (Py_ssize_t)(((uint64_t)(uint32_t)(hh * FIB) * (uint64_t)n) >> 32);
    if (*p2 == *p1 && n > 1)
        *p2 = (*p1 + 1) % n;
}

static inline void where(Pager *self, const char *k, Py_ssize_t klen,
                         uint32_t *h, Py_ssize_t *p1, Py_ssize_t *p2, Py_ssize_t *s0) {
    uint32_t hh = crc32_of(self->seed, k, (size_t)klen);
    *h = hh;
    pages_of(self, hh, p1, p2);
    *s0 = (Py_ssize_t)((hh / (uint64_t)self->npages) % (uint64_t)self->nslots);
}

static inline Py_ssize_t page_off(Pager *self, Py_ssize_t page) {
    return HEADER_SIZE + self->page_size * (page + 1);
}

static inline uint32_t load32(const char *p) {
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED);
}

static inline void store32(char *p, uint32_t v) {
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELAXED);
}

/* Probe page at po for key. Returns 0 when done (found or not), -1 when a slot
 * on the probe path points outside the page's entries or at the key's dead
 * entry: a torn view without the lock, damage with it (_layout invariant 8).
 * so_out, eo_out, free_out as in _pager.Pager.find (absolute offsets; eo 0 = absent). */
static int probe(Pager *self, Py_ssize_t po, const char *k, Py_ssize_t klen, uint32_t h,
                 Py_ssize_t s0, Py_ssize_t *so_out, Py_ssize_t *eo_out, Py_ssize_t *free_out) {
    const char *buf = (const char *)self->view.buf;
    Py_ssize_t nslots = self->nslots, d0 = self->d0;
    Py_ssize_t bump = (Py_ssize_t)load32(buf + po + OFF_BUMP);
    Py_ssize_t base = po + PAGE_HDR_SIZE, i = s0, fr = 0;
    if (bump > self->page_size) bump = self->page_size;
    *so_out = 0; *eo_out = 0; *free_out = 0;
    for (Py_ssize_t step = 0; step < nslots; step++) {
        Py_ssize_t so = base + (i << SLOT_SHIFT);
        uint32_t off;
        memcpy(&off, buf + so, 4);
        if (off == SLOT_EMPTY) {
            *so_out = so; *eo_out = 0; *free_out = fr ? fr : so;
            return 0;
        }
        if (off == SLOT_TOMB) {
            if (!fr) fr = so;
        } else {
            if ((Py_ssize_t)off < d0 || (off & 7) || (Py_ssize_t)off + ENTRY_SIZE > bump) {
                *so_out = so; *free_out = fr;
                return -1;
            }
            Py_ssize_t eo = po + off;
            uint32_t eh, ev; uint16_t ek;
            memcpy(&eh, buf + eo + OFF_E_HASH, 4);
            memcpy(&ev, buf + eo + OFF_E_VLEN, 4);
            memcpy(&ek, buf + eo + OFF_E_KLEN, 2);
            if (eh == h && ek == klen && (Py_ssize_t)off + ENTRY_SIZE + klen <= bump
                && memcmp(buf + eo + ENTRY_SIZE, k, (size_t)klen) == 0) {
                *so_out = so; *free_out = fr;
                if (buf[eo + OFF_DEAD] || (Py_ssize_t)off + ENTRY_SIZE + klen + (Py_ssize_t)ev > bump)
                    return -1;
                *eo_out = eo;
                return 0;
            }
        }
        if (++i == nslots) i = 0;
    }
    *so_out = 0; *eo_out = 0; *free_out = fr;
    return 0;
}

static int get_key(PyObject *key, const char **k, Py_ssize_t *klen) {
    if (!PyBytes_Check(key)) {
        PyErr_SetString(PyExc_TypeError, "key must be bytes");
        return -1;
    }
    *k = PyBytes_AS_STRING(key);
    *klen = PyBytes_GET_SIZE(key);
    return 0;
}

/* A store key as bytes: an exact str (its cached UTF-8, FLAG_STR_KEY) or bytes up
 * to MAX_KEY_SIZE as they are; anything else (a subclass, a bytearray, a lone
 * surrogate, a key too long) goes to host.key(), which returns (bytes, was_str)
 * or raises the store's error.  *owned holds what must be released after. */
static int key_of(Pager *self, PyObject *key, const char **k, Py_ssize_t *klen, uint8_t *flags, PyObject **owned) {
    *owned = NULL;
    if (PyUnicode_CheckExact(key)) {
        *k = PyUnicode_AsUTF8AndSize(key, klen);
        if (*k && *klen <= MAX_KEY_SIZE) { *flags = FLAG_STR_KEY; return 0; }
        PyErr_Clear();
    } else if (PyBytes_CheckExact(key) && PyBytes_GET_SIZE(key) <= MAX_KEY_SIZE) {
        *k = PyBytes_AS_STRING(key); *klen = PyBytes_GET_SIZE(key); *flags = 0;
        return 0;
    }
    PyObject *res = PyObject_CallMethod(self->host, "key", "O", key);
    if (!res) return -1;
    PyObject *kb;
    int was_str;
    if (!PyArg_ParseTuple(res, "Sp", &kb, &was_str)) { Py_DECREF(res); return -1; }
    Py_INCREF(kb);
    Py_DECREF(res);
    *owned = kb;
    *k = PyBytes_AS_STRING(kb); *klen = PyBytes_GET_SIZE(kb); *flags = was_str ? FLAG_STR_KEY : 0;
    return 0;
}

static int check_open(Pager *self) {
    if (!self->have_view) {
        PyErr_SetString(PyExc_ValueError, "pager is closed");
        return -1;
    }
    return 0;
}

static PyObject *Pager_where(Pager *self, PyObject *key) {
    const char *k; Py_ssize_t klen, p1, p2, s0; uint32_t h;
    if (get_key(key, &k, &klen) < 0) return NULL;
    where(self, k, klen, &h, &p1, &p2, &s0);
    return Py_BuildValue("(Innn)", h, p1, p2, s0);
}

static PyObject *Pager_find(Pager *self, PyObject *const *args, Py_ssize_t nargs) {
    const char *k; Py_ssize_t klen, po, s0, so, eo, fr;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "find(page_offset, key, hash, first_slot)");
        return NULL;
    }
    if (check_open(self) < 0 || get_key(args[1], &k, &klen) < 0) return NULL;
    po = PyLong_AsSsize_t(args[0]);
    uint32_t h = (uint32_t)PyLong_AsUnsignedLong(args[2]);
    s0 = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred()) return NULL;
    if (po < HEADER_SIZE || po + self->page_size > self->view.len || s0 < 0 || s0 >= self->nslots) {
        PyErr_SetString(PyExc_ValueError, "page offset or slot out of range");
        return NULL;
    }
    if (probe(self, po, k, klen, h, s0, &so, &eo, &fr) < 0) eo = DAMAGED;
    return Py_BuildValue("(nnn)", so, eo, fr);
}

/* live bytes of a page: bump - dead */
static inline int64_t page_load(Pager *self, Py_ssize_t page) {
    uint32_t counts[4];
    memcpy(counts, (const char *)self->view.buf + page_off(self, page) + OFF_COUNTS, 16);
    return (int64_t)counts[2] - (int64_t)counts[3];
}

/* Is the key in the page at po?  1 yes, 0 no, -1 could not tell (writers kept
 * the page busy: its seq was odd or moved on every try). */
static int holds(Pager *self, Py_ssize_t po, const char *k, Py_ssize_t klen, uint32_t h, Py_ssize_t s0) {
    const char *buf = (const char *)self->view.buf;
    Py_ssize_t so, eo, fr;
    for (int attempt = 0; attempt < READ_TRIES; attempt++) {
        uint64_t s = load_seq(buf + po + OFF_SEQ);
        if (s & 1) continue;
        if (probe(self, po, k, klen, h, s0, &so, &eo, &fr) < 0) continue;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (load_seq(buf + po + OFF_SEQ) == s) return eo != 0;
    }
    return -1;
}

static PyObject *Pager_holds(Pager *self, PyObject *const *args, Py_ssize_t nargs) {
    const char *k; Py_ssize_t klen;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "holds(page_offset, key, hash, first_slot)");
        return NULL;
    }
    if (check_open(self) < 0 || get_key(args[1], &k, &klen) < 0) return NULL;
    Py_ssize_t po = PyLong_AsSsize_t(args[0]), s0 = PyLong_AsSsize_t(args[3]);
    uint32_t h = (uint32_t)PyLong_AsUnsignedLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    if (po < HEADER_SIZE || po + self->page_size > self->view.len || s0 < 0 || s0 >= self->nslots) {
        PyErr_SetString(PyExc_ValueError, "page offset or slot out of range");
        return NULL;
    }
    return PyLong_FromLong(holds(self, po, k, klen, h, s0));
}

/* read(key) -> value bytes | None (absent or expired) | _pager.BUSY (contended) */
static PyObject *read_key(Pager *self, const char *k, Py_ssize_t klen, double *exp);

static PyObject *Pager_read(Pager *self, PyObject *key) {
    const char *k; Py_ssize_t klen; uint8_t flags; PyObject *owned;
    if (check_open(self) < 0 || key_of(self, key, &k, &klen, &flags, &owned) < 0) return NULL;
    PyObject *r = read_key(self, k, klen, NULL);
    Py_XDECREF(owned);
    return r;
}

/* expiry(key) -> float (the entry's expiry, epoch seconds; 0.0: never) | None | BUSY:
 * a lock-free read of the entry's header (_pager.Pager.expiry) */
static PyObject *Pager_expiry(Pager *self, PyObject *key) {
    const char *k; Py_ssize_t klen; uint8_t flags; PyObject *owned;
    if (check_open(self) < 0 || key_of(self, key, &k, &klen, &flags, &owned) < 0) return NULL;
    double exp = 0.0;
    PyObject *r = read_key(self, k, klen, &exp);
    Py_XDECREF(owned);
    if (!r || !PyBytes_Check(r)) return r;  /* None or BUSY */
    Py_DECREF(r);
    return PyFloat_FromDouble(exp);
}

/* the key's live value (and its expiry in *exp, when given), None, or BUSY */
static PyObject *read_key(Pager *self, const char *k, Py_ssize_t klen, double *exp) {
    Py_ssize_t p1, p2, s0; uint32_t h;
    where(self, k, klen, &h, &p1, &p2, &s0);
    char *buf = (char *)self->view.buf;
    Py_ssize_t po1 = page_off(self, p1), po2 = page_off(self, p2), ps = self->page_size;
    /* both pages' first slots and seqs are misses in a large store: start them together
     * (a third of the keys live in their second page) */
    __builtin_prefetch(buf + po1 + PAGE_HDR_SIZE + (s0 << SLOT_SHIFT));
    __builtin_prefetch(buf + po2 + OFF_SEQ);
    __builtin_prefetch(buf + po2 + PAGE_HDR_SIZE + (s0 << SLOT_SHIFT));
    for (int attempt = 0; attempt < READ_TRIES; attempt++) {
        Py_ssize_t so, eo, fr, po;
        uint64_t s1 = load_seq(buf + po1 + OFF_SEQ), s;
        if (s1 & 1) continue;
        if (probe(self, po1, k, klen, h, s0, &so, &eo, &fr) < 0) continue;
        po = po1; s = s1;
        if (!eo && p2 != p1) {
            uint64_t s2 = load_seq(buf + po2 + OFF_SEQ);
            if (s2 & 1) continue;
            if (probe(self, po2, k, klen, h, s0, &so, &eo, &fr) < 0) continue;
            po = po2; s = s2;
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (!eo && load_seq(buf + po1 + OFF_SEQ) != s1) continue;
        }
        if (!eo) {
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (load_seq(buf + po + OFF_SEQ) != s) continue;
            Py_RETURN_NONE;
        }
        Entry e;
        read_entry(buf + eo, &e);
        if (eo - po + ENTRY_SIZE + klen + (Py_ssize_t)e.vlen > ps) continue;  /* torn: the seq check would fail */
        PyObject *value = PyBytes_FromStringAndSize(buf + eo + ENTRY_SIZE + klen, e.vlen);
        if (!value) return NULL;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);  /* the copy is complete before seq is re-read */
        if (load_seq(buf + po + OFF_SEQ) != s) { Py_DECREF(value); continue; }
        /* checksum the validated copies, not the live mapping */
        char head[ENTRY_CRC_SPAN];
        memcpy(head, &e.expire_at, 8); memcpy(head + OFF_E_HASH, &e.hash, 4);
        memcpy(head + OFF_E_VLEN, &e.vlen, 4); memcpy(head + OFF_E_KLEN, &e.klen, 2);
        head[OFF_E_FLAGS] = (char)e.flags;
        uint32_t crc = crc32_of(0, head, ENTRY_CRC_SPAN);
        crc = crc32_of(crc, k, (size_t)klen);
        crc = crc32_of(crc, PyBytes_AS_STRING(value), e.vlen);
        if (crc != e.crc) { Py_DECREF(value); continue; }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        double now = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
        if (e.expire_at != 0.0 && e.expire_at <= now) { Py_DECREF(value); Py_RETURN_NONE; }
        /* LRU hint, deliberately unlocked: it lives in the slot table (see _layout) */
        uint32_t t = tick(&ts), old;
        memcpy(&old, buf + so + SLOT_TICK, 4);
        if (old != t) __atomic_store_n((uint32_t *)(buf + so + SLOT_TICK), t, __ATOMIC_RELAXED);
        if (exp) *exp = e.expire_at;
        return value;
    }
    return Py_NewRef(self->busy);
}


static double now_mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#define LOCK_SPINS 32  /* x 16 pauses: about 1-2 us */

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline pthread_mutex_t *page_lock(Pager *self, Py_ssize_t page) {
    return (pthread_mutex_t *)((char *)self->view.buf + page_off(self, page) + OFF_LOCK);
}

/* Take a page's lock (page -1: the spare) within timeout seconds: the protocol
 * of _locks, the same calls _locks.Mutexes makes through ctypes.  Returns a
 * _locks.Locked value; the GIL is released only while waiting. */
static int lock_page(Pager *self, Py_ssize_t page, double timeout) {
    pthread_mutex_t *m = page_lock(self, page);
    const uint32_t *words = (const uint32_t *)m;
    for (int i = 0; i < self->nfixed; i++)
        if (load32((const char *)(words + self->fixed_at[i])) != self->fixed[i])
            return LOCK_WEDGED;  /* its type changed: the calls would misread it */
    int r = pthread_mutex_trylock(m);
    /* a page is held for a microsecond or two: try a little longer before sleeping
     * in the kernel, whose wake-up costs more than the wait */
    for (int spin = 0; r == EBUSY && spin < LOCK_SPINS; spin++) {
        for (int i = 0; i < 16; i++) cpu_relax();
        r = pthread_mutex_trylock(m);
    }
    if (r == EBUSY) {
        if (timeout <= 0) return LOCK_TIMEOUT;
        struct timespec end;
        clock_gettime(CLOCK_MONOTONIC, &end);
        double whole = (double)(time_t)timeout;
        end.tv_sec += (time_t)whole;
        end.tv_nsec += (long)((timeout - whole) * 1e9);
        if (end.tv_nsec >= 1000000000L) { end.tv_sec++; end.tv_nsec -= 1000000000L; }
        Py_BEGIN_ALLOW_THREADS
        r = pthread_mutex_clocklock(m, CLOCK_MONOTONIC, &end);
        Py_END_ALLOW_THREADS
        if (r == ETIMEDOUT) return LOCK_TIMEOUT;
    }
    if (r == EOWNERDEAD) r = pthread_mutex_consistent(m);  /* the page's seq says what its holder left */
    if (r) return LOCK_WEDGED;  /* EINVAL, ENOTRECOVERABLE, EDEADLK: damaged (see _locks) */
    if (page < 0) return LOCK_SOUND;
    return (load_seq((const char *)self->view.buf + page_off(self, page) + OFF_SEQ) & 1) ? LOCK_DIRTY : LOCK_SOUND;
}

static PyObject *Pager_lock(Pager *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "lock(page, timeout)");
        return NULL;
    }
    Py_ssize_t page = PyLong_AsSsize_t(args[0]);
    double timeout = PyFloat_AsDouble(args[1]);
    if (PyErr_Occurred()) return NULL;
    if (check_open(self) < 0) return NULL;
    if (page < -1 || page >= self->npages) {
        PyErr_SetString(PyExc_ValueError, "page out of range");
        return NULL;
    }
    return PyLong_FromLong(lock_page(self, page, timeout));
}

/* Give a page's lock back.  A refusal (EPERM: not held by this thread) means its
 * bytes were changed while held; the next locker finds it WEDGED and resets it. */
static void unlock_page(Pager *self, Py_ssize_t page) {
    (void)pthread_mutex_unlock(page_lock(self, page));
}

/* the fixed words of an unlocked mutex made the way _locks.template() makes it */
static int learn_fixed_words(Pager *self) {
    union { pthread_mutex_t m; uint32_t w[LOCK_SIZE / 4]; } t;
    pthread_mutexattr_t attr;
    memset(&t, 0, sizeof t);
    if (pthread_mutexattr_init(&attr) || pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED)
        || pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST)
        || pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK) || pthread_mutex_init(&t.m, &attr)) {
        PyErr_SetString(PyExc_OSError, "this C library cannot make process-shared robust mutexes");
        return -1;
    }
    pthread_mutexattr_destroy(&attr);
    self->nfixed = 0;
    for (int i = 0; i < LOCK_SIZE / 4; i++)
        if (t.w[i]) { self->fixed_at[self->nfixed] = (uint32_t)i; self->fixed[self->nfixed++] = t.w[i]; }
    return 0;
}

static PyObject *Pager_unlock(Pager *self, PyObject *arg) {
    Py_ssize_t page = PyLong_AsSsize_t(arg);
    if (page == -1 && PyErr_Occurred()) return NULL;
    if (check_open(self) < 0) return NULL;
    if (page < -1 || page >= self->npages) {
        PyErr_SetString(PyExc_ValueError, "page out of range");
        return NULL;
    }
    unlock_page(self, page);
    Py_RETURN_NONE;
}

static inline void bump_seq(char *seq) {
    uint64_t v = __atomic_load_n((uint64_t *)seq, __ATOMIC_RELAXED) + 1;
    if (v & 1) {  /* odd before the first data store */
        __atomic_store_n((uint64_t *)seq, v, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_RELEASE);
    } else {      /* even after the last */
        __atomic_store_n((uint64_t *)seq, v, __ATOMIC_RELEASE);
    }
}

static PyObject *Pager_bump(Pager *self, PyObject *arg) {
    Py_ssize_t po = PyLong_AsSsize_t(arg);
    if (po == -1 && PyErr_Occurred()) return NULL;
    if (check_open(self) < 0) return NULL;
    if (po < HEADER_SIZE || po + self->page_size > self->view.len) {
        PyErr_SetString(PyExc_ValueError, "page offset out of range");
        return NULL;
    }
    bump_seq((char *)self->view.buf + po + OFF_SEQ);
    Py_RETURN_NONE;
}

/* walk(po, page) -> (entries, end): see _pager.Pager.walk */
static PyObject *Pager_walk(Pager *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "walk(page_offset, page)");
        return NULL;
    }
    if (check_open(self) < 0) return NULL;
    Py_ssize_t po = PyLong_AsSsize_t(args[0]), page = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred()) return NULL;
    Py_ssize_t ps = self->page_size;
    if (po < HEADER_SIZE || po + ps > self->view.len || page < 0 || page >= self->npages) {
        PyErr_SetString(PyExc_ValueError, "walk: page out of range");
        return NULL;
    }
    const char *base = (const char *)self->view.buf + po;
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    Py_ssize_t pos = self->d0, p1, p2;
    while (pos + ENTRY_SIZE <= ps) {
        Entry e;
        read_entry(base + pos, &e);
        Py_ssize_t span = (ENTRY_SIZE + (Py_ssize_t)e.klen + (Py_ssize_t)e.vlen + 7) & ~(Py_ssize_t)7;
        if (pos + span > ps) break;
        const char *key = base + pos + ENTRY_SIZE;
        uint32_t crc = crc32_of(crc32_of(0, base + pos, ENTRY_CRC_SPAN), key, (size_t)e.klen + e.vlen);
        if (crc != e.crc || crc32_of(self->seed, key, e.klen) != e.hash) break;
        pages_of(self, e.hash, &p1, &p2);
        if (page != p1 && page != p2) break;
        PyObject *t = Py_BuildValue("(nnIy#IBdB)", pos, span, e.vlen, key, (Py_ssize_t)e.klen, e.hash,
                                    e.flags, e.expire_at, e.dead);
        if (!t || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(t);
        pos += span;
    }
    return Py_BuildValue("(Nn)", out, pos);
}

/* ------------------------------------------------------------------ the write path
 * put / remove / rebuild: the algorithm of _pager.Pager.put and .remove and of
 * _upkeep.Upkeep.rebuild (the reference), on the same format.  Errors come from
 * the host object given at init: host.timeout(page) and host.meddled(page) build
 * the exception to raise, host.recover(page, wedged) resets a damaged lock. */

/* an entry's header as it goes into the data area (checksummed) */
static void pack_head(char *head, double exp, uint32_t h, uint32_t vlen, uint16_t klen, uint8_t flags,
                      const char *k, const char *v) {
    memcpy(head, &exp, 8); memcpy(head + OFF_E_HASH, &h, 4); memcpy(head + OFF_E_VLEN, &vlen, 4);
    memcpy(head + OFF_E_KLEN, &klen, 2); head[OFF_E_FLAGS] = (char)flags; head[OFF_DEAD] = 0;
    uint32_t crc = crc32_of(crc32_of(crc32_of(0, head, ENTRY_CRC_SPAN), k, (size_t)klen), v, (size_t)vlen);
    memcpy(head + OFF_E_CRC, &crc, 4);
}

static inline Py_ssize_t span_of(Py_ssize_t klen, Py_ssize_t vlen) {
    return (ENTRY_SIZE + klen + vlen + 7) & ~(Py_ssize_t)7;
}

static inline uint32_t now_tick(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return tick(&ts);
}

static inline double now_wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Write a new entry at the locked page's bump pointer and point slot so at it,
 * marking old_eo dead (0: a new key); seq must be odd.  0, changing nothing,
 * when the page lacks the room or the slot (_pager.Pager.append). */
static int append_entry(Pager *self, Py_ssize_t po, Py_ssize_t so, Py_ssize_t old_eo, const char *k,
                        Py_ssize_t klen, uint8_t flags, uint32_t h, const char *v, Py_ssize_t vlen, double exp) {
    char *buf = (char *)self->view.buf, *page = buf + po;
    uint32_t counts[4];  /* entries, used, bump, dead */
    memcpy(counts, page + OFF_COUNTS, sizeof counts);
    Py_ssize_t span = span_of(klen, vlen), ps = self->page_size;
    if ((Py_ssize_t)counts[2] < self->d0 || (counts[2] & 7) || (Py_ssize_t)counts[2] + span > ps || !so)
        return 0;  /* no room, or a damaged bump: the caller rebuilds the page */
    uint32_t cur = load32(buf + so);
    if (!old_eo && cur == SLOT_EMPTY && (Py_ssize_t)counts[1] >= self->max_used) return 0;
    char *e = page + counts[2];
    pack_head(e, exp, h, (uint32_t)vlen, (uint16_t)klen, flags, k, v);
    memcpy(e + ENTRY_SIZE, k, (size_t)klen);
    memcpy(e + ENTRY_SIZE + klen, v, (size_t)vlen);
    memset(e + ENTRY_SIZE + klen + vlen, 0, (size_t)(span - ENTRY_SIZE - klen - vlen));
    uint32_t at = counts[2];
    /* the entry exists before bump passes it, and bump before a slot points at it;
     * one store per field (_layout invariant 2) */
    __atomic_store_n((uint32_t *)(page + OFF_BUMP), at + (uint32_t)span, __ATOMIC_RELEASE);
    store32(buf + so + SLOT_TICK, now_tick());
    __atomic_store_n((uint32_t *)(buf + so), at, __ATOMIC_RELEASE);
    if (old_eo) {
        __atomic_store_n(buf + old_eo + OFF_DEAD, (char)1, __ATOMIC_RELEASE);
        uint32_t ov; uint16_t ok;
        memcpy(&ov, buf + old_eo + OFF_E_VLEN, 4); memcpy(&ok, buf + old_eo + OFF_E_KLEN, 2);
        store32(page + OFF_DEADBYTES, counts[3] + (uint32_t)span_of(ok, ov));
    } else {
        if (cur == SLOT_EMPTY) store32(page + OFF_USED, counts[1] + 1);
        store32(page + OFF_ENTRIES, counts[0] + 1);
    }
    return 1;
}

/* Remove a live entry of a locked page whose seq is odd: tombstone its slot, mark
 * it dead, count it (one store per field; _upkeep.kill). */
static void kill_entry(Pager *self, Py_ssize_t po, Py_ssize_t so, Py_ssize_t eo) {
    char *buf = (char *)self->view.buf, *page = buf + po;
    uint32_t counts[4], ov; uint16_t ok;
    memcpy(counts, page + OFF_COUNTS, sizeof counts);
    memcpy(&ov, buf + eo + OFF_E_VLEN, 4); memcpy(&ok, buf + eo + OFF_E_KLEN, 2);
    store32(buf + so, SLOT_TOMB);
    __atomic_store_n(buf + eo + OFF_DEAD, (char)1, __ATOMIC_RELEASE);
    store32(page + OFF_ENTRIES, counts[0] - 1);
    store32(page + OFF_DEADBYTES, counts[3] + (uint32_t)span_of(ok, ov));
}

typedef struct {
    Py_ssize_t off, span;  /* within the page */
    uint32_t h, vlen, atime;
    uint16_t klen;
    uint8_t flags, dead;
    double exp;
} Ent;

/* Is the entry at off (in [d0, limit)) of the locked page whole: aligned, inside,
 * checksum valid, key hashing to this page, a str key valid UTF-8?  (_layout.whole_entry
 * and the str-key rule of _upkeep.Upkeep.parse) */
static int whole_at(Pager *self, Py_ssize_t po, Py_ssize_t page, Py_ssize_t off, Py_ssize_t limit, Ent *e) {
    const char *base = (const char *)self->view.buf + po;
    Entry x;
    Py_ssize_t p1, p2;
    if (off < self->d0 || (off & 7) || off + ENTRY_SIZE > limit) return 0;
    read_entry(base + off, &x);
    Py_ssize_t span = span_of(x.klen, x.vlen);
    if (off + span > limit) return 0;
    const char *key = base + off + ENTRY_SIZE;
    uint32_t crc = crc32_of(crc32_of(0, base + off, ENTRY_CRC_SPAN), key, (size_t)x.klen + x.vlen);
    if (crc != x.crc || crc32_of(self->seed, key, x.klen) != x.hash) return 0;
    pages_of(self, x.hash, &p1, &p2);
    if (page != p1 && page != p2) return 0;
    if (x.flags & FLAG_STR_KEY) {
        PyObject *s = PyUnicode_DecodeUTF8(key, x.klen, "strict");
        if (!s) { PyErr_Clear(); return 0; }
        Py_DECREF(s);
    }
    e->off = off; e->span = span; e->h = x.hash; e->vlen = x.vlen; e->klen = x.klen;
    e->flags = x.flags; e->dead = x.dead; e->exp = x.expire_at; e->atime = 0;
    return 1;
}

typedef struct { uint32_t off, atime; } SlotRef;

static int by_off(const void *a, const void *b) {
    uint32_t x = ((const SlotRef *)a)->off, y = ((const SlotRef *)b)->off;
    return (x > y) - (x < y);
}

static int ent_by_off(const void *a, const void *b) {
    Py_ssize_t x = ((const Ent *)a)->off, y = ((const Ent *)b)->off;
    return (x > y) - (x < y);
}

/* least recently used first (ages from the tick *now); ties in data order, as
 * Python's stable sort leaves them */
static int ent_by_age(const void *a, const void *b, void *now) {
    const Ent *x = a, *y = b;
    uint32_t t = *(const uint32_t *)now, ax = t - x->atime, ay = t - y->atime;
    if (ax != ay) return ax < ay ? 1 : -1;
    return (x->off > y->off) - (x->off < y->off);
}

static int same_key(const char *base, const Ent *a, const Ent *b) {
    return a->h == b->h && a->klen == b->klen
        && memcmp(base + a->off + ENTRY_SIZE, base + b->off + ENTRY_SIZE, a->klen) == 0;
}

/* Read a locked page by the repair rules (_layout invariant 4; _upkeep.Upkeep.survey),
 * trusting no count: its live entries in data order with their ticks, and whether
 * anything about the page was wrong.  *live is malloc'ed (free it); -1: no memory. */
static int survey(Pager *self, Py_ssize_t page, Py_ssize_t po, Ent **live, Py_ssize_t *nlive, int *unsound) {
    const char *base = (const char *)self->view.buf + po;
    Py_ssize_t nslots = self->nslots, ps = self->page_size, cap = (ps - self->d0) / ENTRY_SIZE + nslots + 1;
    Py_ssize_t tombs = 0, nrefs = 0, nents = 0, tsize = 1;
    while (tsize < 2 * cap) tsize <<= 1;
    SlotRef *refs = PyMem_Malloc(sizeof(SlotRef) * (size_t)nslots);
    Ent *ents = PyMem_Malloc(sizeof(Ent) * (size_t)cap);
    Py_ssize_t *table = PyMem_Calloc((size_t)tsize, sizeof(Py_ssize_t));  /* index + 1 into ents, by key */
    if (!refs || !ents || !table) {
        PyMem_Free(refs); PyMem_Free(ents); PyMem_Free(table);
        PyErr_NoMemory();
        return -1;
    }
    *unsound = 0;
    for (Py_ssize_t i = 0; i < nslots; i++) {
        uint32_t off = load32(base + PAGE_HDR_SIZE + (i << SLOT_SHIFT));
        if (off == SLOT_TOMB) tombs++;
        else if (off != SLOT_EMPTY) {
            refs[nrefs].off = off;
            refs[nrefs++].atime = load32(base + PAGE_HDR_SIZE + (i << SLOT_SHIFT) + SLOT_TICK);
        }
    }
    qsort(refs, (size_t)nrefs, sizeof(SlotRef), by_off);
    for (Py_ssize_t i = 1; i < nrefs; i++)
        if (refs[i].off == refs[i - 1].off) *unsound = 1;  /* two slots point at one entry */
    Ent e;
    Py_ssize_t pos = self->d0;
    /* the walk (in data order), then slot-referenced entries past where it stopped */
    for (int phase = 0; phase < 2; phase++) {
        Py_ssize_t r = 0;
        for (;;) {
            if (phase == 0) {
                if (!whole_at(self, po, page, pos, ps, &e)) break;
                pos += e.span;
            } else {
                while (r < nrefs && (Py_ssize_t)refs[r].off < pos) r++;
                if (r == nrefs) break;
                Py_ssize_t off = refs[r++].off;
                if (!whole_at(self, po, page, off, ps, &e) || e.dead) { *unsound = 1; continue; }
            }
            size_t at = (size_t)e.h & (size_t)(tsize - 1);
            while (table[at] && !same_key(base, &ents[table[at] - 1], &e)) at = (at + 1) & (size_t)(tsize - 1);
            if (table[at]) ents[table[at] - 1] = e;  /* a later entry of a key replaces an earlier one */
            else if (nents < cap) { ents[nents] = e; table[at] = ++nents; }
        }
    }
    uint32_t counts[4];
    memcpy(counts, base + OFF_COUNTS, sizeof counts);
    if (pos != (Py_ssize_t)counts[2]) *unsound = 1;
    Py_ssize_t n = 0, bytes = 0, now = now_tick();
    for (Py_ssize_t i = 0; i < nents; i++) if (!ents[i].dead) ents[n++] = ents[i];
    qsort(ents, (size_t)n, sizeof(Ent), ent_by_off);
    /* every live entry has its slot and every slot its live entry (both sorted by offset) */
    Py_ssize_t r = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        bytes += ents[i].span;
        while (r < nrefs && (Py_ssize_t)refs[r].off < ents[i].off) { r++; *unsound = 1; }
        if (r < nrefs && (Py_ssize_t)refs[r].off == ents[i].off) ents[i].atime = refs[r++].atime;
        else { ents[i].atime = (uint32_t)now; *unsound = 1; }
    }
    if (r < nrefs) *unsound = 1;
    if ((Py_ssize_t)counts[0] != n || (Py_ssize_t)counts[1] != n + tombs
        || (int64_t)counts[2] - self->d0 - counts[3] != bytes)
        *unsound = 1;
    PyMem_Free(refs);
    PyMem_Free(table);
    *live = ents;
    *nlive = n;
    return 0;
}

static int lock_or_raise(Pager *self, Py_ssize_t page, double timeout);

/* _upkeep.Step */
#define STEP_MAKE_ROOM 1
#define STEP_EVICT 2
#define STEP_COMPACT 3
#define STEP_REPAIR 4

static void trace(Pager *self, int step, int entering) {
    if (!self->tracer) return;
    PyObject *r = PyObject_CallFunction(self->tracer, "iO", step, entering ? Py_True : Py_False);
    if (r) Py_DECREF(r);
    else PyErr_WriteUnraisable(self->tracer);
}

/* With the spare locked: finish a page replacement a dead process left half-copied,
 * only onto a page whose seq is odd and only an image whose checksum holds
 * (_upkeep.Upkeep.settle_spare). */
static void settle_spare(Pager *self) {
    char *buf = (char *)self->view.buf;
    if (load32(buf + SPARE_STATE_OFF) == SPARE_EMPTY) return;
    uint32_t st[4];  /* state, target, end, crc */
    memcpy(st, buf + SPARE_STATE_OFF, sizeof st);
    Py_ssize_t ps = self->page_size;
    if (st[0] == SPARE_VALID && (Py_ssize_t)st[1] < self->npages && st[2] > OFF_COUNTS
        && (Py_ssize_t)st[2] <= ps && !(st[2] & 7)) {
        char *spare = buf + page_off(self, -1), *pg = buf + page_off(self, (Py_ssize_t)st[1]);
        if ((load_seq(pg + OFF_SEQ) & 1)
            && crc32_of(0, spare + OFF_COUNTS, st[2] - OFF_COUNTS) == st[3]) {
            memcpy(pg + OFF_COUNTS, spare + OFF_COUNTS, st[2] - OFF_COUNTS);
            memset(pg + st[2], 0, (size_t)(ps - st[2]));
        }
    }
    __atomic_store_n((uint32_t *)(buf + SPARE_STATE_OFF), SPARE_EMPTY, __ATOMIC_RELEASE);
}

/* Rewrite a locked page through the spare (_layout invariant 5) from its entries that
 * pass their checks, without dead and expired ones; with a new entry (packed bytes
 * nb of key nk) the key's entry is replaced by it, and the least recently used
 * entries go as far as it needs the room.  _upkeep.Upkeep.rebuild is the reference. */
static int rebuild(Pager *self, Py_ssize_t page, const char *nb, Py_ssize_t nlen, const char *nk,
                   Py_ssize_t nklen, uint32_t nh) {
    char *buf = (char *)self->view.buf;
    Py_ssize_t po = page_off(self, page), ps = self->page_size, nslots = self->nslots;
    int step = nb ? STEP_MAKE_ROOM : STEP_REPAIR;
    if (lock_or_raise(self, -1, self->timeout) < 0) return -1;
    trace(self, step, 1);
    settle_spare(self);  /* first: a dead writer may have been replacing this page */
    Ent *live; Py_ssize_t n; int unsound;
    char *img = PyMem_Calloc(1, (size_t)ps);
    if (!img || survey(self, page, po, &live, &n, &unsound) < 0) {
        PyMem_Free(img);
        trace(self, step, 0);
        unlock_page(self, -1);
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return -1;
    }
    const char *base = buf + po;
    double now = now_wall();
    Py_ssize_t keep = 0, expired = 0, used = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Ent *e = &live[i];
        if (nb && e->h == nh && e->klen == nklen && memcmp(base + e->off + ENTRY_SIZE, nk, (size_t)nklen) == 0)
            continue;  /* the key's old entry: replaced */
        if (e->exp != 0.0 && e->exp <= now) { expired++; continue; }
        live[keep++] = *e;
        used += e->span;
    }
    Py_ssize_t room = ps - self->d0 - (nb ? nlen : 0), slots = self->max_used - (nb != NULL), evicted = 0;
    if (used > room || keep > slots) {
        uint32_t t = now_tick();
        qsort_r(live, (size_t)keep, sizeof(Ent), ent_by_age, &t);
        Py_ssize_t drop = 0;
        while (drop < keep && (used > room || keep - drop > slots)) used -= live[drop++].span;
        evicted = drop;
        memmove(live, live + drop, sizeof(Ent) * (size_t)(keep - drop));
        keep -= drop;
        qsort(live, (size_t)keep, sizeof(Ent), ent_by_off);
        if (evicted) trace(self, STEP_EVICT, 1);
    }
    /* the image: kept entries in data order, then the new one; slots by probing */
    Py_ssize_t pos = self->d0;
    uint32_t t = now_tick();
    for (Py_ssize_t i = 0; i <= keep; i++) {
        uint32_t h, atime;
        Py_ssize_t len;
        if (i < keep) {
            memcpy(img + pos, base + live[i].off, (size_t)live[i].span);
            h = live[i].h; atime = live[i].atime; len = live[i].span;
        } else if (nb) {
            memcpy(img + pos, nb, (size_t)nlen);
            h = nh; atime = t; len = nlen;
        } else break;
        Py_ssize_t s = (Py_ssize_t)((h / (uint64_t)self->npages) % (uint64_t)nslots);
        while (load32(img + PAGE_HDR_SIZE + (s << SLOT_SHIFT))) if (++s == nslots) s = 0;
        memcpy(img + PAGE_HDR_SIZE + (s << SLOT_SHIFT), &pos, 4);
        memcpy(img + PAGE_HDR_SIZE + (s << SLOT_SHIFT) + SLOT_TICK, &atime, 4);
        pos += len;
    }
    uint32_t count = (uint32_t)(keep + (nb != NULL)), end = (uint32_t)pos, zero = 0;
    uint64_t ctr[3];  /* evictions, expirations, recoveries */
    memcpy(ctr, base + OFF_EVICTIONS, sizeof ctr);
    ctr[0] += (uint64_t)evicted; ctr[1] += (uint64_t)expired; ctr[2] += (uint64_t)(nb == NULL || unsound);
    memcpy(img + OFF_ENTRIES, &count, 4); memcpy(img + OFF_USED, &count, 4);
    memcpy(img + OFF_BUMP, &end, 4); memcpy(img + OFF_DEADBYTES, &zero, 4);
    memcpy(img + OFF_EVICTIONS, ctr, sizeof ctr);
    PyMem_Free(live);
    /* install (invariant 5): the image into the spare, the spare marked valid for this
     * page, copied over the page, the spare marked empty */
    char *spare = buf + page_off(self, -1), *pg = buf + po;
    if (!(load_seq(pg + OFF_SEQ) & 1)) bump_seq(pg + OFF_SEQ);
    trace(self, STEP_COMPACT, 1);
    memcpy(spare + OFF_COUNTS, img + OFF_COUNTS, end - OFF_COUNTS);
    store32(buf + OFF_SPARE_TARGET, (uint32_t)page);
    store32(buf + OFF_SPARE_END, end);
    store32(buf + OFF_SPARE_CRC,
            crc32_of(0, img + OFF_COUNTS, end - OFF_COUNTS));
    __atomic_store_n((uint32_t *)(buf + SPARE_STATE_OFF), SPARE_VALID, __ATOMIC_RELEASE);
    memcpy(pg + OFF_COUNTS, img + OFF_COUNTS, (size_t)(ps - OFF_COUNTS));
    __atomic_store_n((uint32_t *)(buf + SPARE_STATE_OFF), SPARE_EMPTY, __ATOMIC_RELEASE);
    trace(self, STEP_COMPACT, 0);
    bump_seq(pg + OFF_SEQ);
    PyMem_Free(img);
    if (evicted) trace(self, STEP_EVICT, 0);
    trace(self, step, 0);
    unlock_page(self, -1);
    return 0;
}

static PyObject *Pager_rebuild(Pager *self, PyObject *arg) {
    Py_ssize_t page = PyLong_AsSsize_t(arg);
    if (page == -1 && PyErr_Occurred()) return NULL;
    if (check_open(self) < 0) return NULL;
    if (page < 0 || page >= self->npages) {
        PyErr_SetString(PyExc_ValueError, "page out of range");
        return NULL;
    }
    if (rebuild(self, page, NULL, 0, NULL, 0, 0) < 0) return NULL;
    Py_RETURN_NONE;
}

static void raise_from_host(Pager *self, const char *what, Py_ssize_t page) {
    PyObject *exc = PyObject_CallMethod(self->host, what, "n", page);
    if (exc) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
}

static void raise_too_large(Pager *self, Py_ssize_t klen, Py_ssize_t vlen) {
    PyObject *exc = PyObject_CallMethod(self->host, "too_large", "nn", klen, vlen);
    if (exc) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
}

/* Take a page's lock within timeout, resetting a damaged one (host.recover:
 * _locks.recover decides, as _pager.Pager.lock does). */
static int lock_recovering(Pager *self, Py_ssize_t page, double timeout) {
    double first = timeout < HOLDER_CHECK_AFTER ? timeout : HOLDER_CHECK_AFTER;
    double deadline = now_mono() + timeout;
    int r = lock_page(self, page, first), looked = 0;
    while (r == LOCK_WEDGED || (r == LOCK_TIMEOUT && timeout > HOLDER_CHECK_AFTER)) {
        if (r == LOCK_WEDGED || !looked) {
            PyObject *res = PyObject_CallMethod(self->host, "recover", "ni", page, r == LOCK_WEDGED);
            if (!res) return -1;
            Py_DECREF(res);
        }
        looked = 1;
        double left = deadline - now_mono();
        if (left <= 0) return LOCK_TIMEOUT;
        r = lock_page(self, page, left);
        timeout = 0;  /* from here a TIMEOUT is final */
    }
    return r;
}

/* Lock a page for a change: raise the host's timeout error, or repair a page its
 * last writer left mid-change. */
static int lock_or_raise(Pager *self, Py_ssize_t page, double timeout) {
    int r = lock_recovering(self, page, timeout);
    if (r < 0) return -1;
    if (r == LOCK_TIMEOUT) { raise_from_host(self, "timeout", page); return -1; }
    if (r == LOCK_DIRTY && rebuild(self, page, NULL, 0, NULL, 0, 0) < 0) {
        unlock_page(self, page);
        return -1;
    }
    return 0;
}

/* probe a locked page, repairing it first when it fails a check (_pager.Pager.find_locked) */
static int find_locked(Pager *self, Py_ssize_t page, const char *k, Py_ssize_t klen, uint32_t h,
                       Py_ssize_t s0, Py_ssize_t *so, Py_ssize_t *eo, Py_ssize_t *fr) {
    Py_ssize_t po = page_off(self, page);
    if (probe(self, po, k, klen, h, s0, so, eo, fr) == 0) return 0;
    if (rebuild(self, page, NULL, 0, NULL, 0, 0) < 0) return -1;
    if (probe(self, po, k, klen, h, s0, so, eo, fr) == 0) return 0;
    raise_from_host(self, "meddled", page);
    return -1;
}

/* The current value of the key at eo in a locked page, for update(): None when
 * expired; a page whose entry fails its checksum is repaired first and the key
 * looked up again (a damaged value is never handed to the callback). */
static PyObject *old_value(Pager *self, Py_ssize_t page, const char *k, Py_ssize_t klen, uint32_t h,
                           Py_ssize_t s0, Py_ssize_t *so, Py_ssize_t *eo, Py_ssize_t *fr, double *exp) {
    Py_ssize_t po = page_off(self, page);
    Ent e;
    for (int attempt = 0; *eo; attempt++) {
        if (whole_at(self, po, page, *eo - po, self->page_size, &e)) {
            if (e.exp != 0.0 && e.exp <= now_wall()) Py_RETURN_NONE;
            *exp = e.exp;
            return PyBytes_FromStringAndSize((const char *)self->view.buf + *eo + ENTRY_SIZE + klen, e.vlen);
        }
        if (attempt) break;
        if (rebuild(self, page, NULL, 0, NULL, 0, 0) < 0
            || find_locked(self, page, k, klen, h, s0, so, eo, fr) < 0)
            return NULL;
        if (!*eo) *so = *fr;
    }
    Py_RETURN_NONE;
}

/* A get_and_set in flight: fn maps the old value (decoded by loads, unless None;
 * missing when there is none) to the new one (encoded by dumps; None: it must be
 * bytes-like), run with the key in guard (the store's CallbackThreads).  keep: an
 * existing entry keeps its expiry.  result: the last new value. */
typedef struct {
    PyObject *key, *fn, *loads, *dumps, *guard, *missing, *result;
    int keep;
} Updater;

/* the store's SerializationError for the exception being raised by loads or dumps */
static void codec_error(Pager *self, Updater *u, int decoding) {
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (tb) PyException_SetTraceback(exc, tb);
    PyObject *err = PyObject_CallMethod(self->host, "codec_error", "OOi", exc, u->key, decoding);
    if (err) {
        PyException_SetCause(err, Py_NewRef(exc));
        PyErr_SetObject((PyObject *)Py_TYPE(err), err);
        Py_DECREF(err);
    }
    Py_XDECREF(type); Py_XDECREF(exc); Py_XDECREF(tb);
}

/* run u on the old raw value (bytes or None): the new raw value, or NULL */
static PyObject *run_update(Pager *self, Updater *u, PyObject *old) {
    PyObject *arg;
    if (old == Py_None) arg = Py_NewRef(u->missing);
    else if (u->loads != Py_None) {
        if (!(arg = PyObject_CallOneArg(u->loads, old))) { codec_error(self, u, 1); return NULL; }
    } else arg = Py_NewRef(old);
    PyObject *me = PyLong_FromUnsignedLong(PyThread_get_thread_ident());
    if (!me || PySet_Add(u->guard, me) < 0) { Py_XDECREF(me); Py_DECREF(arg); return NULL; }
    PyObject *new = PyObject_CallOneArg(u->fn, arg);  /* user code: the page is locked but unchanged */
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    int gone = PySet_Discard(u->guard, me);
    if (type) PyErr_Restore(type, exc, tb);
    Py_DECREF(me);
    Py_DECREF(arg);
    if (!new || gone < 0) { Py_XDECREF(new); return NULL; }
    PyObject *vb;
    if (u->dumps != Py_None) vb = PyObject_CallOneArg(u->dumps, new);
    else if (PyBytes_CheckExact(new)) vb = Py_NewRef(new);
    else if (PyByteArray_Check(new) || PyMemoryView_Check(new) || PyBytes_Check(new)) vb = PyBytes_FromObject(new);
    else {
        PyErr_Format(PyExc_TypeError, "serializer='raw' stores bytes, not %s", Py_TYPE(new)->tp_name);
        vb = NULL;
    }
    if (vb && !PyBytes_Check(vb)) {
        Py_SETREF(vb, NULL);
        PyErr_SetString(PyExc_TypeError, "dumps() must return bytes");
    }
    if (!vb) { codec_error(self, u, 0); Py_DECREF(new); return NULL; }
    Py_XSETREF(u->result, new);
    return vb;
}

/* With the page locked, write the key's new entry there: eo its current entry (0:
 * none), so the slot to use; u (not NULL) computes the value from the old one. */
static int put_here(Pager *self, Py_ssize_t page, Py_ssize_t so, Py_ssize_t eo, const char *k, Py_ssize_t klen,
                    uint8_t flags, uint32_t h, Py_ssize_t s0, double exp, PyObject *value, Updater *u) {
    Py_ssize_t po = page_off(self, page), fr = 0;
    PyObject *vb;
    if (u) {
        double old_exp = exp;
        PyObject *old = old_value(self, page, k, klen, h, s0, &so, &eo, &fr, &old_exp);
        if (!old) return -1;
        if (u->keep && old != Py_None) exp = old_exp;
        vb = run_update(self, u, old);
        Py_DECREF(old);
        if (!vb) return -1;
    } else vb = Py_NewRef(value);
    const char *v = PyBytes_AS_STRING(vb);
    Py_ssize_t vlen = PyBytes_GET_SIZE(vb), r = 0;
    if (ENTRY_SIZE + klen + vlen > self->page_size - self->d0) {
        raise_too_large(self, klen, vlen);  /* the old value stays */
        Py_DECREF(vb);
        return -1;
    }
    char *pg = (char *)self->view.buf + po;
    bump_seq(pg + OFF_SEQ);
    int done = append_entry(self, po, so, eo, k, klen, flags, h, v, vlen, exp);
    bump_seq(pg + OFF_SEQ);
    if (!done) {  /* no room or no slot: rebuild the page with the new entry in it */
        Py_ssize_t span = span_of(klen, vlen);
        char *nb = PyMem_Calloc(1, (size_t)span);
        if (!nb) { Py_DECREF(vb); PyErr_NoMemory(); return -1; }
        pack_head(nb, exp, h, (uint32_t)vlen, (uint16_t)klen, flags, k, v);
        memcpy(nb + ENTRY_SIZE, k, (size_t)klen);
        memcpy(nb + ENTRY_SIZE + klen, v, (size_t)vlen);
        r = rebuild(self, page, nb, span, k, klen, h);
        PyMem_Free(nb);
    }
    Py_DECREF(vb);
    return (int)r;
}

static int pause_us(long us) {
    struct timespec d = {0, us * 1000};
    Py_BEGIN_ALLOW_THREADS
    nanosleep(&d, NULL);
    Py_END_ALLOW_THREADS
    return 0;
}

static PyObject *put_key(Pager *self, const char *k, Py_ssize_t klen, uint8_t flags, double exp,
                         PyObject *value, Updater *u);

/* put(key, value, lifetime) -> None: store value under key for lifetime seconds
 * (0: never); _pager.Pager.put. */
static PyObject *Pager_put(Pager *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "put(key, value, lifetime)");
        return NULL;
    }
    const char *k; Py_ssize_t klen; uint8_t flags; PyObject *owned;
    double life = PyFloat_AsDouble(args[2]);
    if (life == -1.0 && PyErr_Occurred()) return NULL;
    PyObject *value = args[1];
    if (!PyBytes_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "value must be bytes");
        return NULL;
    }
    if (check_open(self) < 0 || key_of(self, args[0], &k, &klen, &flags, &owned) < 0) return NULL;
    if (ENTRY_SIZE + klen + PyBytes_GET_SIZE(value) > self->page_size - self->d0) {
        raise_too_large(self, klen, PyBytes_GET_SIZE(value));
        Py_XDECREF(owned);
        return NULL;
    }
    PyObject *r = put_key(self, k, klen, flags, life > 0 ? now_wall() + life : 0.0, value, NULL);
    Py_XDECREF(owned);
    return r;
}

/* update(key, fn, lifetime, loads, dumps, guard[, missing[, keep]]) -> the new
 * value: get_and_set, fn run with the key's page locked (Updater);
 * _pager.Pager.update. */
static PyObject *Pager_update(Pager *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 6 || nargs > 8) {
        PyErr_SetString(PyExc_TypeError, "update(key, fn, lifetime, loads, dumps, guard[, missing[, keep]])");
        return NULL;
    }
    int keep = nargs > 7 ? PyObject_IsTrue(args[7]) : 0;
    if (keep < 0) return NULL;
    const char *k; Py_ssize_t klen; uint8_t flags; PyObject *owned;
    double life = PyFloat_AsDouble(args[2]);
    if (life == -1.0 && PyErr_Occurred()) return NULL;
    if (!PyAnySet_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError, "guard must be a set");
        return NULL;
    }
    if (check_open(self) < 0 || key_of(self, args[0], &k, &klen, &flags, &owned) < 0) return NULL;
    Updater u = {args[0], args[1], args[3], args[4], args[5], nargs > 6 ? args[6] : Py_None, NULL, keep};
    PyObject *r = put_key(self, k, klen, flags, life > 0 ? now_wall() + life : 0.0, NULL, &u);
    Py_XDECREF(owned);
    if (!r) { Py_XDECREF(u.result); return NULL; }
    Py_DECREF(r);
    return u.result;
}

static PyObject *put_key(Pager *self, const char *k, Py_ssize_t klen, uint8_t flags, double exp,
                         PyObject *value, Updater *u) {
    Py_ssize_t so, eo, fr, so2, eo2, fr2;
    int backoffs = 0, r;
    for (;;) {
        if (backoffs) pause_us(INSERT_BACKOFF_US);  /* p2 stayed busy and p1 is released: let its holder finish */
        uint32_t h; Py_ssize_t p1, p2, s0;
        where(self, k, klen, &h, &p1, &p2, &s0);
        Py_ssize_t po1 = page_off(self, p1), po2 = page_off(self, p2);
        int in1 = holds(self, po1, k, klen, h, s0);
        int in2 = (in1 == 1 || p2 == p1) ? 0 : holds(self, po2, k, klen, h, s0);
        Py_ssize_t roomier = page_load(self, p2) + (self->page_size >> 5) < page_load(self, p1) ? p2 : p1;
        if (in2 == 1) {  /* lives in its second page: update it there */
            if (lock_or_raise(self, p2, self->timeout) < 0) return NULL;
            r = find_locked(self, p2, k, klen, h, s0, &so, &eo, &fr);
            if (r == 0 && eo) r = put_here(self, p2, so, eo, k, klen, (uint8_t)flags, h, s0, exp, value, u);
            unlock_page(self, p2);
            if (r < 0) return NULL;
            if (eo) Py_RETURN_NONE;
            continue;  /* deleted meanwhile: start over */
        }
        /* p2 (below p1) stayed busy through MAX_BACKOFFS tries: take both in index
         * order, waiting as any locker does (a stuck or damaged lock then times out
         * or is reset, instead of being tried for ever) */
        int second = backoffs >= MAX_BACKOFFS && p2 < p1;
        if (second && lock_or_raise(self, p2, self->timeout) < 0) return NULL;
        if (lock_or_raise(self, p1, self->timeout) < 0) {
            if (second) unlock_page(self, p2);
            return NULL;
        }
        r = find_locked(self, p1, k, klen, h, s0, &so, &eo, &fr);
        if (r < 0) goto out;
        if (eo || p1 == p2) {
            r = put_here(self, p1, eo ? so : fr, eo, k, klen, (uint8_t)flags, h, s0, exp, value, u);
            goto out;
        }
        /* Not in p1; with p1 held nobody can insert it into p2, so what we see of p2
         * now is final (-1: p2 was too busy, or failed a check). */
        in2 = second ? -1 : holds(self, po2, k, klen, h, s0);
        if (in2 > 0) { r = 1; goto out; }
        if (!second && (in2 < 0 || roomier == p2)) {
            if (p2 > p1) {  /* in index order: wait */
                if (lock_or_raise(self, p2, self->timeout) < 0) { r = -1; goto out; }
                second = 1;
            } else {  /* against the order: only try */
                int got = lock_recovering(self, p2, 0.0);
                if (got < 0) { r = -1; goto out; }
                if (got != LOCK_TIMEOUT) {
                    second = 1;
                    if (got == LOCK_DIRTY && rebuild(self, p2, NULL, 0, NULL, 0, 0) < 0) { r = -1; goto out; }
                }
            }
        }
        if (in2 < 0 && !second) { backoffs++; r = 1; goto out; }
        if (second) {
            r = find_locked(self, p2, k, klen, h, s0, &so2, &eo2, &fr2);
            if (r < 0) goto out;
            if (eo2 || roomier == p2) {
                r = put_here(self, p2, eo2 ? so2 : fr2, eo2, k, klen, (uint8_t)flags, h, s0, exp, value, u);
                goto out;
            }
        }
        r = put_here(self, p1, fr, 0, k, klen, (uint8_t)flags, h, s0, exp, value, u);
    out:
        if (second) unlock_page(self, p2);
        unlock_page(self, p1);
        if (r < 0) return NULL;
        if (r == 0) Py_RETURN_NONE;
        /* r == 1: look again */
    }
}

/* remove(key) -> bool: delete the key; True if a live (unexpired) entry went
 * (_pager.Pager.remove). */
static PyObject *remove_key(Pager *self, const char *k, Py_ssize_t klen);

static PyObject *Pager_remove(Pager *self, PyObject *key) {
    const char *k; Py_ssize_t klen; uint8_t flags; PyObject *owned;
    if (check_open(self) < 0 || key_of(self, key, &k, &klen, &flags, &owned) < 0) return NULL;
    PyObject *r = remove_key(self, k, klen);
    Py_XDECREF(owned);
    return r;
}

static PyObject *remove_key(Pager *self, const char *k, Py_ssize_t klen) {
    for (;;) {
        uint32_t h; Py_ssize_t p1, p2, s0, pages[2], np;
        where(self, k, klen, &h, &p1, &p2, &s0);
        int in1 = holds(self, page_off(self, p1), k, klen, h, s0);
        int in2 = (in1 == 1 || p2 == p1) ? 0 : holds(self, page_off(self, p2), k, klen, h, s0);
        if (in1 == 1) { pages[0] = p1; np = 1; }
        else if (in2 == 1) { pages[0] = p2; np = 1; }
        else if (in1 < 0 || in2 < 0) {  /* too busy to tell: look in both, locked in index order */
            pages[0] = p1 < p2 ? p1 : p2; pages[1] = p1 < p2 ? p2 : p1; np = p1 == p2 ? 1 : 2;
        } else Py_RETURN_FALSE;
        Py_ssize_t locked = 0;
        int r = 0, found = 0, live = 0;
        for (; locked < np; locked++)
            if (lock_or_raise(self, pages[locked], self->timeout) < 0) { r = -1; break; }
        for (Py_ssize_t i = 0; r == 0 && i < locked && !found; i++) {
            Py_ssize_t so, eo, fr, po = page_off(self, pages[i]);
            if (find_locked(self, pages[i], k, klen, h, s0, &so, &eo, &fr) < 0) { r = -1; break; }
            if (eo) {
                double exp;
                memcpy(&exp, (const char *)self->view.buf + eo, 8);
                live = !(exp != 0.0 && exp <= now_wall());
                bump_seq((char *)self->view.buf + po + OFF_SEQ);
                kill_entry(self, po, so, eo);
                bump_seq((char *)self->view.buf + po + OFF_SEQ);
                found = 1;
            }
        }
        while (locked > 0) unlock_page(self, pages[--locked]);
        if (r < 0) return NULL;
        if (found) return PyBool_FromLong(live);
        if (np == 2 || (in1 < 0 || in2 < 0)) Py_RETURN_FALSE;  /* in neither page, with both locked */
        /* deleted by someone else between the look and the lock: look again */
    }
}

static PyObject *Pager_trace(Pager *self, PyObject *tracer) {
    Py_XSETREF(self->tracer, tracer == Py_None ? NULL : Py_NewRef(tracer));
    Py_RETURN_NONE;
}

static PyObject *Pager_key_of(Pager *self, PyObject *key) {
    const char *k; Py_ssize_t klen; uint8_t flags; PyObject *owned;
    if (key_of(self, key, &k, &klen, &flags, &owned) < 0) return NULL;
    PyObject *r = Py_BuildValue("(y#i)", k, klen, (int)flags);
    Py_XDECREF(owned);
    return r;
}

static PyObject *Pager_hold(Pager *self, PyObject *arg) {
    Py_ssize_t page = PyLong_AsSsize_t(arg);
    if (page == -1 && PyErr_Occurred()) return NULL;
    if (check_open(self) < 0) return NULL;
    if (page < -1 || page >= self->npages) {
        PyErr_SetString(PyExc_ValueError, "page out of range");
        return NULL;
    }
    if (lock_or_raise(self, page, self->timeout) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Pager_find_locked(Pager *self, PyObject *const *args, Py_ssize_t nargs) {
    const char *k; Py_ssize_t klen, so, eo, fr;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "find_locked(page, key, hash, first_slot)");
        return NULL;
    }
    if (check_open(self) < 0 || get_key(args[1], &k, &klen) < 0) return NULL;
    Py_ssize_t page = PyLong_AsSsize_t(args[0]), s0 = PyLong_AsSsize_t(args[3]);
    uint32_t h = (uint32_t)PyLong_AsUnsignedLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    if (page < 0 || page >= self->npages || s0 < 0 || s0 >= self->nslots) {
        PyErr_SetString(PyExc_ValueError, "page or slot out of range");
        return NULL;
    }
    if (find_locked(self, page, k, klen, h, s0, &so, &eo, &fr) < 0) return NULL;
    return Py_BuildValue("(nnn)", so, eo, fr);
}

static PyObject *Pager_close(Pager *self, PyObject *unused) {
    if (self->have_view) {
        PyBuffer_Release(&self->view);
        self->have_view = 0;
    }
    Py_CLEAR(self->host);
    Py_CLEAR(self->tracer);
    Py_CLEAR(self->busy);
    Py_RETURN_NONE;
}

static int Pager_init(Pager *self, PyObject *args, PyObject *kw) {
    PyObject *mm, *host; unsigned long seed; Py_ssize_t npages, page_size, nslots, max_used; double timeout;
    static char *kwlist[] = {"mm", "seed", "npages", "page_size", "nslots", "max_used", "host",
                             "lock_timeout", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OknnnnOd", kwlist, &mm, &seed, &npages,
                                     &page_size, &nslots, &max_used, &host, &timeout))
        return -1;
    if (npages < 1 || nslots < 1 || page_size < 4096 || max_used < 1 || max_used >= nslots) {
        PyErr_SetString(PyExc_ValueError, "bad geometry");
        return -1;
    }
    Pager_close(self, NULL);
    self->npages = npages;
    if (PyObject_GetBuffer(mm, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) return -1;
    self->have_view = 1;
    if (self->view.len < HEADER_SIZE + page_size * (npages + 1)) {
        Pager_close(self, NULL);
        PyErr_SetString(PyExc_ValueError, "mapping smaller than its geometry");
        return -1;
    }
    self->seed = (uint32_t)seed;
    if (learn_fixed_words(self) < 0) {
        Pager_close(self, NULL);
        return -1;
    }
    PyObject *pager_mod = PyImport_ImportModule("prefork_sessions._pager");
    self->busy = pager_mod ? PyObject_GetAttrString(pager_mod, "BUSY") : NULL;
    Py_XDECREF(pager_mod);
    if (!self->busy) {
        Pager_close(self, NULL);
        return -1;
    }
    Py_INCREF(host);
    self->host = host;
    self->timeout = timeout;
    self->npages = npages; self->page_size = page_size; self->nslots = nslots;
    self->max_used = max_used;
    self->d0 = PAGE_HDR_SIZE + (nslots << SLOT_SHIFT);
    return 0;
}

static void Pager_dealloc(Pager *self) {
    Pager_close(self, NULL);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Pager_methods[] = {
    {"where", (PyCFunction)Pager_where, METH_O, "where(key) -> (hash, p1, p2, first_slot)"},
    {"find", (PyCFunction)(void (*)(void))Pager_find, METH_FASTCALL, "find(po, key, hash, s0) -> (so, eo, free)"},
    {"holds", (PyCFunction)(void (*)(void))Pager_holds, METH_FASTCALL,
     "holds(po, key, hash, s0) -> 1 | 0 | -1 (too busy to tell)"},
    {"read", (PyCFunction)Pager_read, METH_O, "read(key) -> value bytes | None (absent or expired) | BUSY (contended)"},
    {"expiry", (PyCFunction)Pager_expiry, METH_O,
     "expiry(key) -> the entry's expiry (epoch seconds, 0.0: never) | None (absent or expired) | BUSY"},
    {"lock", (PyCFunction)(void (*)(void))Pager_lock, METH_FASTCALL,
     "lock(page, timeout) -> a _locks.Locked value (SOUND, DIRTY: repair first, TIMEOUT, WEDGED)"},
    {"unlock", (PyCFunction)Pager_unlock, METH_O, "unlock(page)"},
    {"bump", (PyCFunction)Pager_bump, METH_O, "bump(page_offset): seq += 1 (odd: begin, even: end)"},
    {"trace", (PyCFunction)Pager_trace, METH_O, "trace(tracer | None): tell tracer(step, entering) the steps of rewrites"},
    {"key_of", (PyCFunction)Pager_key_of, METH_O, "key_of(key) -> (bytes, flags), or the store's key error"},
    {"hold", (PyCFunction)Pager_hold, METH_O, "hold(page): lock for a change (repairs; raises host.timeout)"},
    {"find_locked", (PyCFunction)(void (*)(void))Pager_find_locked, METH_FASTCALL,
     "find_locked(page, key, hash, s0) -> (so, eo, free), repairing a page that fails a check"},
    {"put", (PyCFunction)(void (*)(void))Pager_put, METH_FASTCALL,
     "put(key, value, lifetime): store value for lifetime seconds (0: never)"},
    {"update", (PyCFunction)(void (*)(void))Pager_update, METH_FASTCALL,
     "update(key, fn, lifetime, loads, dumps, guard) -> fn(old value or None), stored atomically"},
    {"remove", (PyCFunction)Pager_remove, METH_O, "remove(key) -> True if a live entry went"},
    {"rebuild", (PyCFunction)Pager_rebuild, METH_O, "rebuild(page): repair a locked page through the spare"},
    {"walk", (PyCFunction)(void (*)(void))Pager_walk, METH_FASTCALL,
     "walk(po, page) -> (list of (off, span, vlen, key, hash, flags, expire_at, dead), end)"},
    {"close", (PyCFunction)Pager_close, METH_NOARGS, "release the mapping"},
    {NULL}
};

static PyTypeObject PagerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "prefork_sessions._speedups.Pager",
    .tp_basicsize = sizeof(Pager),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Pager_init,
    .tp_dealloc = (destructor)Pager_dealloc,
    .tp_methods = Pager_methods,
    .tp_doc = "Hot-path access to a mapped store file (C version of _pager.Pager).",
};

/* Is a NaN or infinite float anywhere in a value orjson serialised (it writes them
 * as null)?  _serializers._has_non_finite is the reference: floats, dict keys and
 * values, list and tuple items, and the value of an instance of enum_type. */
static int non_finite(PyObject *o, PyObject *enum_type) {
    /* the common leaves first, by exact type: a session is mostly str, int, None */
    if (PyUnicode_CheckExact(o) || PyLong_CheckExact(o) || o == Py_None || PyBool_Check(o)) return 0;
    if (PyFloat_Check(o)) return !isfinite(PyFloat_AS_DOUBLE(o));
    if (PyDict_Check(o)) {
        Py_ssize_t pos = 0;
        PyObject *k, *v;
        while (PyDict_Next(o, &pos, &k, &v)) {
            Py_INCREF(k); Py_INCREF(v);  /* an enum's value is Python code: hold what we walk */
            int r = PyUnicode_CheckExact(k) ? 0 : non_finite(k, enum_type);
            if (r == 0) r = non_finite(v, enum_type);
            Py_DECREF(k); Py_DECREF(v);
            if (r) return r;
        }
        return 0;
    }
    if (PyList_Check(o)) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(o); i++) {
            PyObject *item = Py_NewRef(PyList_GET_ITEM(o, i));
            int r = non_finite(item, enum_type);
            Py_DECREF(item);
            if (r) return r;
        }
        return 0;
    }
    if (PyTuple_Check(o)) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(o); i++) {
            int r = non_finite(PyTuple_GET_ITEM(o, i), enum_type);
            if (r) return r;
        }
        return 0;
    }
    if (PyLong_Check(o) || PyUnicode_Check(o)) return 0;
    int is_enum = PyObject_IsInstance(o, enum_type);
    if (is_enum <= 0) return is_enum;
    PyObject *value = PyObject_GetAttrString(o, "value");
    if (!value) return -1;
    int r = non_finite(value, enum_type);  /* depth: orjson serialised it, so at most 255 levels */
    Py_DECREF(value);
    return r;
}

static PyObject *speedups_has_non_finite(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "has_non_finite(value, enum_type)");
        return NULL;
    }
    int r = non_finite(args[0], args[1]);
    if (r < 0) return NULL;
    return PyBool_FromLong(r);
}

static PyMethodDef module_methods[] = {
    {"has_non_finite", (PyCFunction)(void (*)(void))speedups_has_non_finite, METH_FASTCALL,
     "has_non_finite(value, enum_type): a NaN or infinity anywhere in a JSON-able value"},
    {"crc32", (PyCFunction)(void (*)(void))speedups_crc32, METH_FASTCALL,
     "crc32(data, value=0): zlib.crc32, as the C pager computes it"},
    {NULL}
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_speedups", "C hot path for prefork_sessions.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    detect_cpu();
    if (PyType_Ready(&PagerType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&PagerType);
    if (PyModule_AddObject(m, "Pager", (PyObject *)&PagerType) < 0) {
        Py_DECREF(&PagerType);
        Py_DECREF(m);
        return NULL;
    }
    /* the constants this file compiles in, for a test that they equal _layout's */
    PyObject *layout = Py_BuildValue(
        "{sisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisisi}",
        "HEADER_SIZE", HEADER_SIZE, "OFF_LOCK", OFF_LOCK, "LOCK_SIZE", LOCK_SIZE, "OFF_SEQ", OFF_SEQ,
        "OFF_COUNTS", OFF_COUNTS, "OFF_ENTRIES", OFF_ENTRIES, "OFF_USED", OFF_USED, "OFF_BUMP", OFF_BUMP,
        "OFF_DEADBYTES", OFF_DEADBYTES, "PAGE_HDR_SIZE", PAGE_HDR_SIZE, "SLOT_SHIFT", SLOT_SHIFT,
        "ENTRY_SIZE", ENTRY_SIZE, "ENTRY_CRC_SPAN", ENTRY_CRC_SPAN, "OFF_E_HASH", OFF_E_HASH,
        "OFF_E_VLEN", OFF_E_VLEN, "OFF_E_KLEN", OFF_E_KLEN, "OFF_E_FLAGS", OFF_E_FLAGS,
        "OFF_DEAD", OFF_DEAD, "OFF_E_CRC", OFF_E_CRC, "SLOT_EMPTY", SLOT_EMPTY, "SLOT_TOMB", SLOT_TOMB,
        "DAMAGED", DAMAGED, "TICKS_PER_SECOND", 16, "SLOT_TICK", SLOT_TICK, "OFF_EVICTIONS", OFF_EVICTIONS,
        "FLAG_STR_KEY", FLAG_STR_KEY, "SPARE_STATE_OFF", SPARE_STATE_OFF, "SPARE_EMPTY", SPARE_EMPTY,
        "SPARE_VALID", SPARE_VALID, "OFF_SPARE_TARGET", OFF_SPARE_TARGET, "OFF_SPARE_END", OFF_SPARE_END,
        "OFF_SPARE_CRC", OFF_SPARE_CRC);
    if (!layout || PyModule_AddObject(m, "LAYOUT", layout) < 0) {
        Py_XDECREF(layout);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *locked = Py_BuildValue("{sisisisi}", "SOUND", LOCK_SOUND, "DIRTY", LOCK_DIRTY,
                                     "TIMEOUT", LOCK_TIMEOUT, "WEDGED", LOCK_WEDGED);
    if (!locked || PyModule_AddObject(m, "LOCKED", locked) < 0) {
        Py_XDECREF(locked);
        Py_DECREF(m);
        return NULL;
    }
    PyObject *tuning = Py_BuildValue("{sdsdsisi}", "HOLDER_CHECK_AFTER", HOLDER_CHECK_AFTER,
                                     "INSERT_BACKOFF", INSERT_BACKOFF_US / 1e6, "READ_TRIES", READ_TRIES,
                                     "MAX_BACKOFFS", MAX_BACKOFFS);
    if (!tuning || PyModule_AddObject(m, "TUNING", tuning) < 0) {
        Py_XDECREF(tuning);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
