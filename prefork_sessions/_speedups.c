/* C version of prefork_sessions._pager.Pager: the store's hot path (hashing,
 * slot probing and the lock-free seqlock read).  It implements exactly the
 * format and rules of _layout.py and the algorithm of _pager.py, which remains
 * the reference and the fallback when this module cannot be built.
 *
 * Seqlock: the page's seq is loaded with acquire ordering before and after the
 * entry is copied, so the copy is validated on every CPU architecture. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <pthread.h>
#include <time.h>
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
#define DAMAGED (-1)     /* the entry offset find() returns for a failed check */
#define FIB 0x9E3779B1u  /* _pager.FIB */
#define READ_TRIES 4     /* _pager.READ_TRIES */
/* _locks.Locked */
#define LOCK_SOUND 0
#define LOCK_DIRTY 1
#define LOCK_TIMEOUT 2
#define LOCK_WEDGED 3

_Static_assert(sizeof(pthread_mutex_t) <= LOCK_SIZE, "a page header has no room for this pthread_mutex_t");

typedef struct {
    PyObject_HEAD
    Py_buffer view;      /* the writable mapping; held until close() */
    int have_view;
    uint32_t seed;
    Py_ssize_t npages, page_size, nslots, max_used, d0;
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

/* a key's two candidate pages from its hash: _pager.pages_of */
static inline void pages_of(Pager *self, uint32_t hh, Py_ssize_t *p1, Py_ssize_t *p2) {
    Py_ssize_t n = self->npages;
    *p1 = (Py_ssize_t)(hh % (uint64_t)n);
    *p2 = (Py_ssize_t)(((uint64_t)(uint32_t)(hh * FIB) * (uint64_t)n) >> 32);
    if (*p2 == *p1 && n > 1)
        *p2 = (*p1 + 1) % n;
}

static inline void where(Pager *self, const char *k, Py_ssize_t klen,
                         uint32_t *h, Py_ssize_t *p1, Py_ssize_t *p2, Py_ssize_t *s0) {
    uint32_t hh = (uint32_t)crc32(self->seed, (const Bytef *)k, (uInt)klen);
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
 * *so/*eo/*fr as in _pager.Pager.find (absolute offsets; eo 0 = absent). */
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

/* locate(key) -> (hash, p1, p2, first_slot, page holding it: -1 none, -2 unknown,
 * roomier page).  Lock-free and seqlock-validated; see _pager.Pager.locate. */
static PyObject *Pager_locate(Pager *self, PyObject *key) {
    const char *k; Py_ssize_t klen, p1, p2, s0, page = -1; uint32_t h;
    if (check_open(self) < 0 || get_key(key, &k, &klen) < 0) return NULL;
    where(self, k, klen, &h, &p1, &p2, &s0);
    int in1 = holds(self, page_off(self, p1), k, klen, h, s0);
    int in2 = (in1 == 1 || p2 == p1) ? 0 : holds(self, page_off(self, p2), k, klen, h, s0);
    if (in1 == 1) page = p1;
    else if (in2 == 1) page = p2;
    else if (in1 < 0 || in2 < 0) page = -2;
    /* two-choice placement, leaning to the home page (whose lock an insert holds
     * anyway) unless the other is emptier by a margin: see _pager.Pager.locate */
    Py_ssize_t roomier = page_load(self, p2) + (self->page_size >> 5) < page_load(self, p1) ? p2 : p1;
    return Py_BuildValue("(Innnnn)", h, p1, p2, s0, page, roomier);
}

/* read(key) -> value bytes | None (absent or expired) | False (contended) */
static PyObject *Pager_read(Pager *self, PyObject *key) {
    const char *k; Py_ssize_t klen, p1, p2, s0; uint32_t h;
    if (check_open(self) < 0 || get_key(key, &k, &klen) < 0) return NULL;
    where(self, k, klen, &h, &p1, &p2, &s0);
    char *buf = (char *)self->view.buf;
    Py_ssize_t po1 = page_off(self, p1), po2 = page_off(self, p2), ps = self->page_size;
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
        uLong crc = crc32(0L, (const Bytef *)head, ENTRY_CRC_SPAN);
        crc = crc32(crc, (const Bytef *)k, (uInt)klen);
        crc = crc32(crc, (const Bytef *)PyBytes_AS_STRING(value), (uInt)e.vlen);
        if ((uint32_t)crc != e.crc) { Py_DECREF(value); continue; }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        double now = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
        if (e.expire_at != 0.0 && e.expire_at <= now) { Py_DECREF(value); Py_RETURN_NONE; }
        /* LRU hint, deliberately unlocked: it lives in the slot table (see _layout) */
        uint32_t t = tick(&ts), old;
        memcpy(&old, buf + so + SLOT_TICK, 4);
        if (old != t) __atomic_store_n((uint32_t *)(buf + so + SLOT_TICK), t, __ATOMIC_RELAXED);
        return value;
    }
    Py_RETURN_FALSE;
}


static inline pthread_mutex_t *page_lock(Pager *self, Py_ssize_t page) {
    return (pthread_mutex_t *)((char *)self->view.buf + page_off(self, page) + OFF_LOCK);
}

/* Take a page's lock (page -1: the spare) within timeout seconds: the protocol
 * of _locks, the same calls _locks.Mutexes makes through ctypes.  Returns a
 * _locks.Locked value; the GIL is released only while waiting. */
static int lock_page(Pager *self, Py_ssize_t page, double timeout) {
    pthread_mutex_t *m = page_lock(self, page);
    int r = pthread_mutex_trylock(m);
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

static int unlock_page(Pager *self, Py_ssize_t page) {
    int r = pthread_mutex_unlock(page_lock(self, page));
    if (r) {
        errno = r;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
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
    if (unlock_page(self, page) < 0) return NULL;
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

/* append(po, so, old_eo, key, flags, hash, value, expire_at, bracket) -> bool
 * Write a new entry at the page's bump pointer and point slot `so` at it,
 * marking `old_eo` dead (0: a new key).  Returns False, changing nothing, when
 * the page lacks the room or the slot.  bracket: make seq odd/even around it. */
static PyObject *Pager_append(Pager *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "append() takes 9 arguments");
        return NULL;
    }
    if (check_open(self) < 0) return NULL;
    Py_ssize_t po = PyLong_AsSsize_t(args[0]), so = PyLong_AsSsize_t(args[1]);
    Py_ssize_t old_eo = PyLong_AsSsize_t(args[2]);
    long flags = PyLong_AsLong(args[4]);
    uint32_t h = (uint32_t)PyLong_AsUnsignedLong(args[5]);
    double exp = PyFloat_AsDouble(args[7]);
    int bracket = PyObject_IsTrue(args[8]);
    if (PyErr_Occurred()) return NULL;
    if (!PyBytes_Check(args[3]) || !PyBytes_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError, "key and value must be bytes");
        return NULL;
    }
    const char *k = PyBytes_AS_STRING(args[3]), *v = PyBytes_AS_STRING(args[6]);
    Py_ssize_t klen = PyBytes_GET_SIZE(args[3]), vlen = PyBytes_GET_SIZE(args[6]);
    Py_ssize_t ps = self->page_size;
    if (po < HEADER_SIZE || po + ps > self->view.len || klen > 0xFFFF || vlen > 0xFFFFFFFFL
        || (so && (so < po + PAGE_HDR_SIZE || so >= po + PAGE_HDR_SIZE + (self->nslots << SLOT_SHIFT)))
        || (old_eo && (old_eo < po || old_eo + ENTRY_SIZE > po + ps))) {
        PyErr_SetString(PyExc_ValueError, "append: offsets out of range");
        return NULL;
    }
    char *buf = (char *)self->view.buf, *page = buf + po;
    uint32_t counts[4];  /* entries, used, bump, dead */
    memcpy(counts, page + OFF_COUNTS, 16);
    Py_ssize_t span = (ENTRY_SIZE + klen + vlen + 7) & ~(Py_ssize_t)7;
    uint32_t cur;
    if ((Py_ssize_t)counts[2] < self->d0 || (counts[2] & 7) || (Py_ssize_t)counts[2] + span > ps || !so)
        Py_RETURN_FALSE;  /* no room, or a damaged bump: the caller rebuilds the page */
    memcpy(&cur, buf + so, 4);
    if (!old_eo && cur == SLOT_EMPTY && (Py_ssize_t)counts[1] >= self->max_used) Py_RETURN_FALSE;
    if (bracket) bump_seq(page + OFF_SEQ);
    char head[ENTRY_SIZE];
    uint16_t k16 = (uint16_t)klen; uint32_t v32 = (uint32_t)vlen; uint8_t f8 = (uint8_t)flags, zero = 0;
    memcpy(head, &exp, 8); memcpy(head + OFF_E_HASH, &h, 4); memcpy(head + OFF_E_VLEN, &v32, 4);
    memcpy(head + OFF_E_KLEN, &k16, 2); head[OFF_E_FLAGS] = (char)f8; head[OFF_DEAD] = (char)zero;
    uint32_t crc = (uint32_t)crc32(crc32(crc32(0L, (const Bytef *)head, ENTRY_CRC_SPAN),
                                         (const Bytef *)k, (uInt)klen), (const Bytef *)v, (uInt)vlen);
    memcpy(head + OFF_E_CRC, &crc, 4);
    char *e = page + counts[2];
    memcpy(e, head, ENTRY_SIZE);
    memcpy(e + ENTRY_SIZE, k, (size_t)klen);
    memcpy(e + ENTRY_SIZE + klen, v, (size_t)vlen);
    uint32_t at = counts[2];
    /* the entry exists before bump passes it, and bump before a slot points at it;
     * one store per field (_layout invariant 2) */
    __atomic_store_n((uint32_t *)(page + OFF_BUMP), at + (uint32_t)span, __ATOMIC_RELEASE);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    store32(buf + so + SLOT_TICK, tick(&ts));
    __atomic_store_n((uint32_t *)(buf + so), at, __ATOMIC_RELEASE);
    if (old_eo) {
        __atomic_store_n(buf + old_eo + OFF_DEAD, (char)1, __ATOMIC_RELEASE);
        uint32_t ov; uint16_t ok;
        memcpy(&ov, buf + old_eo + OFF_E_VLEN, 4); memcpy(&ok, buf + old_eo + OFF_E_KLEN, 2);
        store32(page + OFF_DEADBYTES, counts[3] + (uint32_t)((ENTRY_SIZE + ok + ov + 7) & ~7u));
    } else {
        if (cur == SLOT_EMPTY) store32(page + OFF_USED, counts[1] + 1);
        store32(page + OFF_ENTRIES, counts[0] + 1);
    }
    if (bracket) bump_seq(page + OFF_SEQ);
    Py_RETURN_TRUE;
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
        uLong crc = crc32(crc32(0L, (const Bytef *)(base + pos), ENTRY_CRC_SPAN),
                          (const Bytef *)key, (uInt)(e.klen + e.vlen));
        if ((uint32_t)crc != e.crc || (uint32_t)crc32(self->seed, (const Bytef *)key, e.klen) != e.hash) break;
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

static PyObject *Pager_close(Pager *self, PyObject *unused) {
    if (self->have_view) {
        PyBuffer_Release(&self->view);
        self->have_view = 0;
    }
    Py_RETURN_NONE;
}

static int Pager_init(Pager *self, PyObject *args, PyObject *kw) {
    PyObject *mm; unsigned long seed; Py_ssize_t npages, page_size, nslots, max_used;
    static char *kwlist[] = {"mm", "seed", "npages", "page_size", "nslots", "max_used", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oknnnn", kwlist, &mm, &seed, &npages,
                                     &page_size, &nslots, &max_used))
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
    {"locate", (PyCFunction)Pager_locate, METH_O, "locate(key) -> (hash, p1, p2, s0, page | -1 none | -2 unknown, roomier page)"},
    {"read", (PyCFunction)Pager_read, METH_O, "read(key) -> value bytes | None (absent or expired) | False (contended)"},
    {"lock", (PyCFunction)(void (*)(void))Pager_lock, METH_FASTCALL,
     "lock(page, timeout) -> a _locks.Locked value (SOUND, DIRTY: repair first, TIMEOUT, WEDGED)"},
    {"unlock", (PyCFunction)Pager_unlock, METH_O, "unlock(page)"},
    {"bump", (PyCFunction)Pager_bump, METH_O, "bump(page_offset): seq += 1 (odd: begin, even: end)"},
    {"append", (PyCFunction)(void (*)(void))Pager_append, METH_FASTCALL,
     "append(po, so, old_eo, key, flags, hash, value, expire_at, bracket) -> bool"},
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

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_speedups", "C hot path for prefork_sessions.", -1, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void) {
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
        "{sisisisisisisisisisisisisisisisisisisisisisisi}",
        "HEADER_SIZE", HEADER_SIZE, "OFF_LOCK", OFF_LOCK, "LOCK_SIZE", LOCK_SIZE, "OFF_SEQ", OFF_SEQ,
        "OFF_COUNTS", OFF_COUNTS, "OFF_ENTRIES", OFF_ENTRIES, "OFF_USED", OFF_USED, "OFF_BUMP", OFF_BUMP,
        "OFF_DEADBYTES", OFF_DEADBYTES, "PAGE_HDR_SIZE", PAGE_HDR_SIZE, "SLOT_SHIFT", SLOT_SHIFT,
        "ENTRY_SIZE", ENTRY_SIZE, "ENTRY_CRC_SPAN", ENTRY_CRC_SPAN, "OFF_E_HASH", OFF_E_HASH,
        "OFF_E_VLEN", OFF_E_VLEN, "OFF_E_KLEN", OFF_E_KLEN, "OFF_E_FLAGS", OFF_E_FLAGS,
        "OFF_DEAD", OFF_DEAD, "OFF_E_CRC", OFF_E_CRC, "SLOT_EMPTY", SLOT_EMPTY, "SLOT_TOMB", SLOT_TOMB,
        "DAMAGED", DAMAGED, "TICKS_PER_SECOND", 16);
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
    return m;
}
