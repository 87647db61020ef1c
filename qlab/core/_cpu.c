/* qlab.core._cpu: three of qlab's CPU loops in C, on torch's OpenMP threads.
 *
 *   decode4   packed 4-bit codes -> float32 (qlab/core/decode4.py): AVX-512's 16-lane permute (vpermps) looks
 *             16 codes up in the group's 16 values held in a register, an instruction numba does not emit;
 *   decode8   8-bit integer codes -> float32 (decode4.py's decode8);
 *   e4m3      float32 / scale -> E4M3 codes (qlab/core/formats/floating.py's e4m3_codes).
 *
 * Each gives the bits of its numba loop (the fallback when this module is not built): the same float32
 * operations in the same order, never fused (built with -ffp-contract=off). The work is split over
 * `threads` OpenMP threads. torch's libgomp is already loaded under the same name (libgomp.so.1), so the
 * loader gives this module that one: torch's thread pool, not a second one competing with it for the cores.
 * The GIL is released while the loops run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define QLAB_X86 1
#include <immintrin.h>
/* plain loops compiled three times, the best one picked at load time (the default build targets SSE2 only) */
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* [lo, hi) of `n` items for this thread */
#define THREAD_RANGE(n, lo, hi)                                                         \
    Py_ssize_t lo = (n) * omp_get_thread_num() / omp_get_num_threads(),                 \
               hi = (n) * (omp_get_thread_num() + 1) / omp_get_num_threads()
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

/* below this many values, one thread: torch's own grain (at::internal::GRAIN_SIZE) */
#define GRAIN 32768
#define THREADS(n, threads) ((n) < GRAIN ? 1 : (threads))

enum { PLAIN, ZERO_POINT, MINIMUM };

/* what the decoders read: n values, L consecutive ones per group (the last group may be shorter) */
typedef struct {
    const uint8_t *codes;  /* decode4: packed two per byte, low nibble first; decode8: one per byte */
    const float *table;    /* decode4: the grid's 16 values */
    float qmin;            /* decode8: value = code + qmin */
    const float *scale, *zero_point, *minimum;
    Py_ssize_t n, L;
    int mode;
    float *out;
} groups_t;

/* ---- decode4 -------------------------------------------------------------------------------------------- */

/* the group's 16 values T[i] = (table[i] - zero_point) * scale, table[i] * scale + minimum or table[i] * scale */
static void group_table(const groups_t *J, Py_ssize_t g, float *T) {
    const float s = J->scale[g];
    for (int i = 0; i < 16; i++) {
        if (J->mode == MINIMUM) T[i] = J->table[i] * s + J->minimum[g];
        else if (J->mode == ZERO_POINT) T[i] = (J->table[i] - J->zero_point[g]) * s;
        else T[i] = J->table[i] * s;
    }
}

static void decode4_groups(const groups_t *J, Py_ssize_t g0, Py_ssize_t g1) {
    float T[16];
    for (Py_ssize_t g = g0; g < g1; g++) {
        Py_ssize_t start = g * J->L, stop = start + J->L < J->n ? start + J->L : J->n;
        const uint8_t *pb = J->codes + (start >> 1);
        float *out = J->out + start;
        group_table(J, g, T);
        for (Py_ssize_t j = 0; j < (stop >> 1) - (start >> 1); j++) {
            out[2 * j] = T[pb[j] & 15];
            out[2 * j + 1] = T[pb[j] >> 4];
        }
        if (stop & 1)  /* an odd count: the last byte holds one code, in its low nibble */
            J->out[stop - 1] = T[J->codes[stop >> 1] & 15];
    }
}

#ifdef QLAB_X86
/* The same with T in a register: 16 bytes per step are widened to 16 int32, split into nibbles and interleaved
 * (low, high, low, ...) into two vectors of 16 codes, each permuting T. The whole loop is compiled for AVX-512:
 * no SSE code between the vector steps (switching costs hundreds of cycles). */
__attribute__((target("avx512f")))
static void decode4_groups_avx512(const groups_t *J, Py_ssize_t g0, Py_ssize_t g1) {
    const __m512 table = _mm512_loadu_ps(J->table);
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i nibble = _mm512_set1_epi32(15);
    float T[16];
    for (Py_ssize_t g = g0; g < g1; g++) {
        Py_ssize_t start = g * J->L, stop = start + J->L < J->n ? start + J->L : J->n;
        const __m512 s = _mm512_set1_ps(J->scale[g]);
        const __m512 t = J->mode == MINIMUM ? _mm512_add_ps(_mm512_mul_ps(table, s), _mm512_set1_ps(J->minimum[g]))
                       : J->mode == ZERO_POINT ? _mm512_mul_ps(_mm512_sub_ps(table, _mm512_set1_ps(J->zero_point[g])), s)
                       : _mm512_mul_ps(table, s);
        const uint8_t *pb = J->codes + (start >> 1);
        float *out = J->out + start;
        Py_ssize_t nbytes = (stop >> 1) - (start >> 1), j = 0;
        for (; j + 16 <= nbytes; j += 16) {
            __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(pb + j)));
            __m512i lo = _mm512_and_si512(b, nibble), hi = _mm512_srli_epi32(b, 4);
            _mm512_storeu_ps(out + 2 * j, _mm512_permutexvar_ps(_mm512_permutex2var_epi32(lo, first, hi), t));
            _mm512_storeu_ps(out + 2 * j + 16, _mm512_permutexvar_ps(_mm512_permutex2var_epi32(lo, second, hi), t));
        }
        if (j < nbytes || (stop & 1)) {  /* fewer than 16 bytes left */
            _mm512_storeu_ps(T, t);
            for (; j < nbytes; j++) {
                out[2 * j] = T[pb[j] & 15];
                out[2 * j + 1] = T[pb[j] >> 4];
            }
            if (stop & 1)
                J->out[stop - 1] = T[J->codes[stop >> 1] & 15];
        }
    }
    _mm256_zeroupper();
}
#endif

static int use_avx512;

static void decode4_run(const groups_t *J, Py_ssize_t n_groups, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        THREAD_RANGE(n_groups, g0, g1);
#ifdef QLAB_X86
        if (use_avx512) decode4_groups_avx512(J, g0, g1);
        else
#endif
            decode4_groups(J, g0, g1);
    }
}

/* ---- decode8 -------------------------------------------------------------------------------------------- */

VECTOR_CLONES
static void decode8_groups(const groups_t *J, Py_ssize_t g0, Py_ssize_t g1) {
    for (Py_ssize_t g = g0; g < g1; g++) {
        Py_ssize_t start = g * J->L, stop = start + J->L < J->n ? start + J->L : J->n;
        const uint8_t *c = J->codes;
        float *out = J->out, s = J->scale[g], qmin = J->qmin;
        if (J->mode == MINIMUM) {
            float mn = J->minimum[g];
            for (Py_ssize_t k = start; k < stop; k++) out[k] = ((float)c[k] + qmin) * s + mn;
        } else if (J->mode == ZERO_POINT) {
            float zp = J->zero_point[g];
            for (Py_ssize_t k = start; k < stop; k++) out[k] = (((float)c[k] + qmin) - zp) * s;
        } else {
            for (Py_ssize_t k = start; k < stop; k++) out[k] = ((float)c[k] + qmin) * s;
        }
    }
}

static void decode8_run(const groups_t *J, Py_ssize_t n_groups, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        THREAD_RANGE(n_groups, g0, g1);
        decode8_groups(J, g0, g1);
    }
}

/* ---- e4m3 ----------------------------------------------------------------------------------------------- */

/* The E4M3 code of v rounded to nearest even, saturating at +-448 (inf too), NaN to 0x7F with its sign: the
 * bits of torch's cast of the clamped value (floating.py's _e4m3_run, which says how). Branch-free. */
static inline uint8_t e4m3(float v) {
    int32_t w;
    memcpy(&w, &v, 4);
    int32_t a = w & 0x7FFFFFFF;
    float steps = fabsf(v) * 512.0f;  /* below 2^-6: subnormal steps of 2^-9 */
    int32_t sub = (int32_t)rintf(steps < 8.0f ? steps : 8.0f);  /* (NaN and large values -> 8, not used) */
    int32_t normal = (a - (120 << 23) + 0x7FFFF + ((a >> 20) & 1)) >> 20;
    normal = normal < 0x7E ? normal : 0x7E;
    int32_t big = a > 0x7F800000 ? 0x7F : 0x7E;
    int32_t code = a >= 0x43F00000 ? big : (a < (121 << 23) ? sub : normal);
    return (uint8_t)(code | ((w >> 24) & 0x80));
}

VECTOR_CLONES
static void e4m3_range(const float *x, const float *scale, Py_ssize_t L, uint8_t *out, Py_ssize_t k0, Py_ssize_t k1) {
    for (Py_ssize_t g = k0 / L; g * L < k1; g++) {  /* row by row: a contiguous run per row vectorises */
        Py_ssize_t a = g * L > k0 ? g * L : k0, b = (g + 1) * L < k1 ? (g + 1) * L : k1;
        const float s = scale[g];
        for (Py_ssize_t k = a; k < b; k++) out[k] = e4m3(x[k] / s);
    }
}

/* ---- arguments ------------------------------------------------------------------------------------------ */

/* a C-contiguous buffer of `format` items ("f": float32, "B": uint8), at least `need` of them; None is allowed
 * when `optional` (view->obj stays NULL) */
static int get_buffer(PyObject *obj, Py_buffer *view, const char *format, Py_ssize_t need, int optional,
                      int writable, const char *name) {
    view->obj = NULL;
    if (obj == Py_None && optional) return 0;
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (!view->format || strcmp(view->format, format) || view->len / view->itemsize < need) {
        PyErr_Format(PyExc_ValueError, "%s must be a contiguous %s array of at least %zd values", name,
                     *format == 'f' ? "float32" : "uint8", need);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    return 0;
}

static void release(Py_buffer *views, int count) {
    for (int i = 0; i < count; i++)
        if (views[i].obj) PyBuffer_Release(&views[i]);
}

/* decode4 and decode8 share their arguments: (codes, n, table_or_qmin, L, scale, zero_point, minimum, out, threads) */
static PyObject *decode(PyObject *args, int bits) {
    PyObject *o[7];  /* codes, table or qmin, scale, zero_point, minimum, out */
    Py_ssize_t n, L;
    int threads;
    if (!PyArg_ParseTuple(args, "OnOnOOOOi", &o[0], &n, &o[1], &L, &o[2], &o[3], &o[4], &o[5], &threads)) return NULL;
    Py_ssize_t n_groups = L > 0 ? (n + L - 1) / L : 0;
    if (L <= 0 || (bits == 4 && L % 2) || n < 0 || threads < 1) {
        PyErr_Format(PyExc_ValueError, "decode%d: need n >= 0, L > 0%s and threads >= 1; got n=%zd, L=%zd, "
                     "threads=%d", bits, bits == 4 ? " and even" : "", n, L, threads);
        return NULL;
    }
    Py_buffer v[6];  /* codes, table, scale, zero_point, minimum, out */
    memset(v, 0, sizeof v);
    groups_t J = {0};
    if (bits == 8) {
        J.qmin = (float)PyFloat_AsDouble(o[1]);
        if (PyErr_Occurred()) return NULL;
    }
    if (get_buffer(o[0], &v[0], "B", bits == 4 ? (n + 1) / 2 : n, 0, 0, "codes") ||
        (bits == 4 && get_buffer(o[1], &v[1], "f", 16, 0, 0, "table")) ||
        get_buffer(o[2], &v[2], "f", n_groups, 0, 0, "scale") ||
        get_buffer(o[3], &v[3], "f", n_groups, 1, 0, "zero_point") ||
        get_buffer(o[4], &v[4], "f", n_groups, 1, 0, "minimum") ||
        get_buffer(o[5], &v[5], "f", n, 0, 1, "out")) {
        release(v, 6);
        return NULL;
    }
    J.codes = v[0].buf, J.table = v[1].buf, J.scale = v[2].buf, J.zero_point = v[3].buf, J.minimum = v[4].buf;
    J.n = n, J.L = L, J.out = v[5].buf;
    J.mode = v[4].obj ? MINIMUM : v[3].obj ? ZERO_POINT : PLAIN;
    Py_BEGIN_ALLOW_THREADS
    if (bits == 4) decode4_run(&J, n_groups, THREADS(n, threads));
    else decode8_run(&J, n_groups, THREADS(n, threads));
    Py_END_ALLOW_THREADS
    release(v, 6);
    Py_RETURN_NONE;
}

static PyObject *decode4(PyObject *self, PyObject *args) { return decode(args, 4); }
static PyObject *decode8(PyObject *self, PyObject *args) { return decode(args, 8); }

static PyObject *e4m3_codes(PyObject *self, PyObject *args) {
    PyObject *o[3];
    Py_ssize_t L;
    int threads;
    if (!PyArg_ParseTuple(args, "OnOOi", &o[0], &L, &o[1], &o[2], &threads)) return NULL;
    Py_buffer v[3];  /* x, scale, out */
    memset(v, 0, sizeof v);
    if (L <= 0 || threads < 1) {
        PyErr_Format(PyExc_ValueError, "e4m3_codes: need L > 0 and threads >= 1; got L=%zd, threads=%d", L, threads);
        return NULL;
    }
    if (get_buffer(o[0], &v[0], "f", 0, 0, 0, "x")) return NULL;
    Py_ssize_t n = v[0].len / 4;
    if (get_buffer(o[1], &v[1], "f", (n + L - 1) / L, 0, 0, "scale") || get_buffer(o[2], &v[2], "B", n, 0, 1, "out")) {
        release(v, 3);
        return NULL;
    }
    const float *x = v[0].buf, *scale = v[1].buf;
    uint8_t *out = v[2].buf;
    Py_BEGIN_ALLOW_THREADS
    #pragma omp parallel num_threads(THREADS(n, threads))
    {
        THREAD_RANGE(n, k0, k1);
        e4m3_range(x, scale, L, out, k0, k1);
    }
    Py_END_ALLOW_THREADS
    release(v, 3);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode4", decode4, METH_VARARGS,
     "decode4(packed, n, table, L, scale, zero_point, minimum, out, threads): the n values of 4-bit codes packed\n"
     "two per byte (low nibble first) into out (float32); every L (even) consecutive values share an entry of\n"
     "scale and of zero_point or minimum (None or float32 arrays); table: the grid's 16 values."},
    {"decode8", decode8, METH_VARARGS,
     "decode8(codes, n, qmin, L, scale, zero_point, minimum, out, threads): the n values (code + qmin) of uint8\n"
     "codes, scaled per run of L as decode4 scales, into out (float32)."},
    {"e4m3_codes", e4m3_codes, METH_VARARGS,
     "e4m3_codes(x, L, scale, out, threads): the E4M3 code of x[k] / scale[k // L] into out (uint8)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu", "qlab's CPU loops in C (qlab/core/_cpu.c).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__cpu(void) {
#ifdef QLAB_X86
    __builtin_cpu_init();
    use_avx512 = __builtin_cpu_supports("avx512f");
#endif
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddStringConstant(m, "decode4_simd", use_avx512 ? "avx512" : "none") < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
