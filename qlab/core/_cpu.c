/* qlab.core._cpu: four of qlab's CPU loops in C, on torch's OpenMP threads.
 *
 *   decode4   packed 4-bit codes -> float32 (qlab/core/decode4.py): AVX-512's 16-lane permute (vpermps) looks
 *             16 codes up in the group's 16 values held in a register, an instruction numba does not emit;
 *   decode8   8-bit codes -> float32 through the grid's 256 values (decode4.py's decode8);
 *   e4m3      float32 / scale -> E4M3 codes (qlab/core/formats/floating.py's e4m3_codes);
 *   int       float32 / scale + zero point -> integer-grid codes (qlab/core/formats/integer.py's int_codes).
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
#define VECTOR_CLONES __attribute__((target_clones("arch=skylake-avx512", "avx2", "default")))
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
    const float *table;    /* the grid's 16 (decode4) or 256 (decode8) values */
    const float *scale, *zero_point, *minimum;
    Py_ssize_t n, L;
    int mode;
    float *out;
} groups_t;

/* ---- decode4 -------------------------------------------------------------------------------------------- */
/* Each thread decodes the values [k0, k1) (k0 even), group by group: the part [a, b) of group g inside it. */

static inline Py_ssize_t part_start(const groups_t *J, Py_ssize_t g, Py_ssize_t k0) { return g * J->L > k0 ? g * J->L : k0; }
static inline Py_ssize_t part_stop(const groups_t *J, Py_ssize_t g, Py_ssize_t k1) { return (g + 1) * J->L < k1 ? (g + 1) * J->L : k1; }

/* the group's 16 values T[i] = (table[i] - zero_point) * scale, table[i] * scale + minimum or table[i] * scale */
static void group_table(const groups_t *J, Py_ssize_t g, float *T) {
    const float s = J->scale[g];
    for (int i = 0; i < 16; i++) {
        if (J->mode == MINIMUM) T[i] = J->table[i] * s + J->minimum[g];
        else if (J->mode == ZERO_POINT) T[i] = (J->table[i] - J->zero_point[g]) * s;
        else T[i] = J->table[i] * s;
    }
}

/* values [a, b) with T: a is even; an odd b (the tensor's end) is a last code alone in a low nibble */
static void lookup4(const uint8_t *codes, Py_ssize_t a, Py_ssize_t b, const float *T, float *out) {
    for (Py_ssize_t j = a >> 1; j < b >> 1; j++) {
        out[2 * j] = T[codes[j] & 15];
        out[2 * j + 1] = T[codes[j] >> 4];
    }
    if (b & 1) out[b - 1] = T[codes[b >> 1] & 15];
}

static void decode4_range(const groups_t *J, Py_ssize_t k0, Py_ssize_t k1) {
    float T[16];
    for (Py_ssize_t g = k0 / J->L; g * J->L < k1; g++) {
        Py_ssize_t a = part_start(J, g, k0), b = part_stop(J, g, k1);
        group_table(J, g, T);
        lookup4(J->codes, a, b, T, J->out);
    }
}

#ifdef QLAB_X86
/* The same with T in a register: 16 bytes per step are widened to 16 int32, split into nibbles and interleaved
 * (low, high, low, ...) into two vectors of 16 codes, each permuting T. The whole loop is compiled for AVX-512:
 * no SSE code between the vector steps (switching costs hundreds of cycles). */
__attribute__((target("avx512f")))
static void decode4_range_avx512(const groups_t *J, Py_ssize_t k0, Py_ssize_t k1) {
    const __m512 table = _mm512_loadu_ps(J->table);
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i nibble = _mm512_set1_epi32(15);
    float T[16];
    for (Py_ssize_t g = k0 / J->L; g * J->L < k1; g++) {
        Py_ssize_t a = part_start(J, g, k0), b = part_stop(J, g, k1);
        const __m512 s = _mm512_set1_ps(J->scale[g]);
        const __m512 t = J->mode == MINIMUM ? _mm512_add_ps(_mm512_mul_ps(table, s), _mm512_set1_ps(J->minimum[g]))
                       : J->mode == ZERO_POINT ? _mm512_mul_ps(_mm512_sub_ps(table, _mm512_set1_ps(J->zero_point[g])), s)
                       : _mm512_mul_ps(table, s);
        Py_ssize_t j = a >> 1;
        for (; j + 16 <= b >> 1; j += 16) {
            __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(J->codes + j)));
            __m512i lo = _mm512_and_si512(c, nibble), hi = _mm512_srli_epi32(c, 4);
            _mm512_storeu_ps(J->out + 2 * j, _mm512_permutexvar_ps(_mm512_permutex2var_epi32(lo, first, hi), t));
            _mm512_storeu_ps(J->out + 2 * j + 16, _mm512_permutexvar_ps(_mm512_permutex2var_epi32(lo, second, hi), t));
        }
        if (2 * j < b) {  /* fewer than 16 bytes left */
            _mm512_storeu_ps(T, t);
            lookup4(J->codes, 2 * j, b, T, J->out);
        }
    }
    _mm256_zeroupper();
}
#endif

static int use_avx512;

static void decode4_run(const groups_t *J, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        THREAD_RANGE(J->n, k0, k1);
        k0 &= ~(Py_ssize_t)1, k1 = k1 == J->n ? k1 : k1 & ~(Py_ssize_t)1;  /* no byte split between threads */
#ifdef QLAB_X86
        if (use_avx512) decode4_range_avx512(J, k0, k1);
        else
#endif
            decode4_range(J, k0, k1);
    }
}

/* ---- decode8 -------------------------------------------------------------------------------------------- */

/* An integer grid's table is table[0] + code: then the value is computed, not looked up (the same float, and a
 * loop that vectorises; a lookup does not). `affine`: that holds bit for bit for all 256 codes. */
VECTOR_CLONES
static void decode8_range(const groups_t *J, Py_ssize_t k0, Py_ssize_t k1, int affine) {
    const uint8_t *c = J->codes;
    const float *table = J->table, t0 = table[0];
    float *out = J->out;
    for (Py_ssize_t g = k0 / J->L; g * J->L < k1; g++) {
        Py_ssize_t a = part_start(J, g, k0), b = part_stop(J, g, k1);
        const float s = J->scale[g];
        if (affine) {
            if (J->mode == MINIMUM) for (Py_ssize_t k = a; k < b; k++) out[k] = ((float)c[k] + t0) * s + J->minimum[g];
            else if (J->mode == ZERO_POINT) for (Py_ssize_t k = a; k < b; k++) out[k] = (((float)c[k] + t0) - J->zero_point[g]) * s;
            else for (Py_ssize_t k = a; k < b; k++) out[k] = ((float)c[k] + t0) * s;
        } else {
            if (J->mode == MINIMUM) for (Py_ssize_t k = a; k < b; k++) out[k] = table[c[k]] * s + J->minimum[g];
            else if (J->mode == ZERO_POINT) for (Py_ssize_t k = a; k < b; k++) out[k] = (table[c[k]] - J->zero_point[g]) * s;
            else for (Py_ssize_t k = a; k < b; k++) out[k] = table[c[k]] * s;
        }
    }
}

static int is_affine(const float *table) {
    for (int i = 0; i < 256; i++) {
        float v = (float)i + table[0];
        if (memcmp(&v, &table[i], 4)) return 0;
    }
    return 1;
}

static void decode8_run(const groups_t *J, int threads) {
    int affine = is_affine(J->table);
    #pragma omp parallel num_threads(threads)
    {
        THREAD_RANGE(J->n, k0, k1);
        decode8_range(J, k0, k1, affine);
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

static void e4m3_range(const float *x, const float *scale, Py_ssize_t L, uint8_t *out, Py_ssize_t k0, Py_ssize_t k1) {
    for (Py_ssize_t g = k0 / L; g * L < k1; g++) {
        Py_ssize_t a = g * L > k0 ? g * L : k0, b = (g + 1) * L < k1 ? (g + 1) * L : k1;
        for (Py_ssize_t k = a; k < b; k++) out[k] = e4m3(x[k] / scale[g]);
    }
}

#ifdef QLAB_X86
/* e4m3() on 16 values at a time (gcc's own vectorisation of it ran at 1.7x numba's time) */
__attribute__((target("avx512f")))
static void e4m3_range_avx512(const float *x, const float *scale, Py_ssize_t L, uint8_t *out, Py_ssize_t k0,
                              Py_ssize_t k1) {
    const __m512i abs_bits = _mm512_set1_epi32(0x7FFFFFFF), one = _mm512_set1_epi32(1);
    for (Py_ssize_t g = k0 / L; g * L < k1; g++) {
        Py_ssize_t a = g * L > k0 ? g * L : k0, b = (g + 1) * L < k1 ? (g + 1) * L : k1, k = a;
        const __m512 s = _mm512_set1_ps(scale[g]);
        for (; k + 16 <= b; k += 16) {
            __m512 v = _mm512_div_ps(_mm512_loadu_ps(x + k), s);
            __m512i w = _mm512_castps_si512(v), A = _mm512_and_si512(w, abs_bits);
            /* min(|v| * 512, 8), rounded to nearest even (the default rounding mode): NaN -> 8, as fminf-free e4m3() */
            __m512i sub = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_mul_ps(_mm512_castsi512_ps(A), _mm512_set1_ps(512.0f)),
                                                           _mm512_set1_ps(8.0f)));
            __m512i normal = _mm512_srai_epi32(_mm512_add_epi32(_mm512_sub_epi32(A, _mm512_set1_epi32((120 << 23) - 0x7FFFF)),
                                                                _mm512_and_si512(_mm512_srli_epi32(A, 20), one)), 20);
            normal = _mm512_min_epi32(normal, _mm512_set1_epi32(0x7E));
            __m512i big = _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(A, _mm512_set1_epi32(0x7F800000)),
                                                  _mm512_set1_epi32(0x7E), _mm512_set1_epi32(0x7F));
            __m512i code = _mm512_mask_blend_epi32(_mm512_cmplt_epi32_mask(A, _mm512_set1_epi32(121 << 23)), normal, sub);
            code = _mm512_mask_blend_epi32(_mm512_cmpge_epi32_mask(A, _mm512_set1_epi32(0x43F00000)), code, big);
            code = _mm512_or_si512(code, _mm512_and_si512(_mm512_srli_epi32(w, 24), _mm512_set1_epi32(0x80)));
            _mm_storeu_si128((__m128i *)(out + k), _mm512_cvtepi32_epi8(code));
        }
        for (; k < b; k++) out[k] = e4m3(x[k] / scale[g]);
    }
    _mm256_zeroupper();
}
#endif

/* ---- integer codes -------------------------------------------------------------------------------------- */

/* The code of x[k] / scale[g] + zero_point[g] on the integer grid [qmin, qmax]: the value rounded to nearest
 * even (torch.round), clamped, minus qmin (integer.py's int_codes: IntGrid.encode_nearest's bits). */
VECTOR_CLONES
static void int_range(const float *x, const float *scale, const float *zero_point, Py_ssize_t L, float qmin,
                      float qmax, uint8_t *out, Py_ssize_t k0, Py_ssize_t k1) {
    for (Py_ssize_t g = k0 / L; g * L < k1; g++) {
        Py_ssize_t a = g * L > k0 ? g * L : k0, b = (g + 1) * L < k1 ? (g + 1) * L : k1;
        const float s = scale[g], z = zero_point ? zero_point[g] : 0.0f;  /* (+0 changes no rounded value) */
        for (Py_ssize_t k = a; k < b; k++) {
            float v = rintf(x[k] / s + z);
            v = v < qmin ? qmin : (v > qmax ? qmax : v);
            out[k] = (uint8_t)(int32_t)(v - qmin);
        }
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

/* decode4 and decode8 share their arguments: (codes, n, table, L, scale, zero_point, minimum, out, threads) */
static PyObject *decode(PyObject *args, int bits) {
    PyObject *o[6];  /* codes, table, scale, zero_point, minimum, out */
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
    if (get_buffer(o[0], &v[0], "B", bits == 4 ? (n + 1) / 2 : n, 0, 0, "codes") ||
        get_buffer(o[1], &v[1], "f", 1 << bits, 0, 0, "table") ||
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
    if (bits == 4) decode4_run(&J, THREADS(n, threads));
    else decode8_run(&J, THREADS(n, threads));
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
#ifdef QLAB_X86
        if (use_avx512) e4m3_range_avx512(x, scale, L, out, k0, k1);
        else
#endif
            e4m3_range(x, scale, L, out, k0, k1);
    }
    Py_END_ALLOW_THREADS
    release(v, 3);
    Py_RETURN_NONE;
}

static PyObject *int_codes(PyObject *self, PyObject *args) {
    PyObject *o[4];
    Py_ssize_t L;
    float qmin, qmax;
    int threads;
    if (!PyArg_ParseTuple(args, "OnOOffOi", &o[0], &L, &o[1], &o[2], &qmin, &qmax, &o[3], &threads)) return NULL;
    if (L <= 0 || threads < 1 || !(qmin <= qmax) || qmin < -128 || qmax - qmin > 255) {
        PyErr_Format(PyExc_ValueError, "int_codes: need L > 0, threads >= 1 and an integer grid of at most 8 bits; "
                     "got L=%zd, threads=%d, [%g, %g]", L, threads, qmin, qmax);
        return NULL;
    }
    Py_buffer v[4];  /* x, scale, zero_point, out */
    memset(v, 0, sizeof v);
    if (get_buffer(o[0], &v[0], "f", 0, 0, 0, "x")) return NULL;
    Py_ssize_t n = v[0].len / 4, n_groups = (n + L - 1) / L;
    if (get_buffer(o[1], &v[1], "f", n_groups, 0, 0, "scale") || get_buffer(o[2], &v[2], "f", n_groups, 1, 0, "zero_point") ||
        get_buffer(o[3], &v[3], "B", n, 0, 1, "out")) {
        release(v, 4);
        return NULL;
    }
    const float *x = v[0].buf, *scale = v[1].buf, *zero_point = v[2].buf;
    uint8_t *out = v[3].buf;
    Py_BEGIN_ALLOW_THREADS
    #pragma omp parallel num_threads(THREADS(n, threads))
    {
        THREAD_RANGE(n, k0, k1);
        int_range(x, scale, zero_point, L, qmin, qmax, out, k0, k1);
    }
    Py_END_ALLOW_THREADS
    release(v, 4);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode4", decode4, METH_VARARGS,
     "decode4(packed, n, table, L, scale, zero_point, minimum, out, threads): the n values of 4-bit codes packed\n"
     "two per byte (low nibble first) into out (float32); every L (even) consecutive values share an entry of\n"
     "scale and of zero_point or minimum (None or float32 arrays); table: the grid's 16 values."},
    {"decode8", decode8, METH_VARARGS,
     "decode8(codes, n, table, L, scale, zero_point, minimum, out, threads): the n values table[code] of uint8\n"
     "codes (table: the grid's 256 values), scaled per run of L as decode4 scales, into out (float32)."},
    {"e4m3_codes", e4m3_codes, METH_VARARGS,
     "e4m3_codes(x, L, scale, out, threads): the E4M3 code of x[k] / scale[k // L] into out (uint8)."},
    {"int_codes", int_codes, METH_VARARGS,
     "int_codes(x, L, scale, zero_point, qmin, qmax, out, threads): the code clamp(round(x[k] / scale[g] +\n"
     "zero_point[g]), qmin, qmax) - qmin of each value (g = k // L; zero_point None or float32) into out (uint8)."},
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
