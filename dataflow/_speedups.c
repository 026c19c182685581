/* Native versions of the per-value loops of the parse step and the Arrow conversion.
 *
 * Each is an exact stand-in for Python code that stays the reference
 * (dataflow/extjson.py, events.py, validate.py, arrow_convert.py): anything
 * they are not sure of is handed back to it, so the accepted inputs, the
 * values and the errors are the same whether or not this module is built
 * (dataflow/speedups.py switches between them; tests/test_speedups.py
 * compares them).
 *
 *   payload_span(value) -> (start, end) | None
 *       Where the payload of a JSON-converter envelope {"schema": S, "payload": P}
 *       lies, so only P is parsed: S (the Connect schema, about a third of a
 *       Debezium message) is checked for valid JSON syntax here but never built
 *       into Python objects (and a prefix once checked is remembered). None when
 *       the message does not look exactly like that, or S uses anything but
 *       plain ASCII: the caller then parses it all.
 *
 *   walk(root, handlers, classify, plain) -> None, or "int64" / "nul"
 *       extjson._walk in C: replaces every Extended JSON type wrapper under root
 *       by its value, in place, in the same order. The common wrappers
 *       ($numberInt, $numberLong, $numberDouble, $date as milliseconds; not $oid,
 *       an ObjectId made in Python) are decoded here when they have their usual
 *       form, and an integer past int64 or a NUL in a field name is noted; everything else is the
 *       Python handler's job, and its exception propagates unchanged.
 *
 *   names_ok(d) -> bool
 *       True when validate.check_field_names(d) would find nothing wrong.
 *
 *   columns(rows, n, skip) -> (values, types) | None
 *       arrow_convert's per-field value lists and value types, in one pass.
 *
 *   json_elements(buf) -> (texts, suspects) | None
 *       orjson's text of a whole column split back into each value's text.
 *
 *   timestamps_us(values) -> (data, validity, null_count) | None
 *       A timestamp[us, UTC] column's Arrow buffers from UTC datetimes.
 *
 * walk and columns call back into Python (handlers, classify, a key's __hash__ and
 * __eq__, a type's __hash__), and that code may change the containers being read:
 * around such calls they hold references to all they use afterwards, and check the
 * containers afterwards as Python's own iteration does. Values that cannot lead to
 * Python code take no references: in walk anything but a dict, in columns a str key
 * with a value whose type's metaclass is type.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <datetime.h>
#include <stdint.h>
#include <string.h>

/* ---------------------------------------------------------------- payload_span */

#define MAX_SCHEMA_DEPTH 64

typedef struct {
    const unsigned char *p;
    const unsigned char *end;
} scan_t;

static void skip_ws(scan_t *s) {
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r')) s->p++;
}

/* A string of printable ASCII and simple escapes; \u escapes and anything else: give up. */
static int scan_string(scan_t *s) {
    if (s->p >= s->end || *s->p != '"') return 0;
    s->p++;
    while (s->p < s->end) {
        unsigned char c = *s->p++;
        if (c == '"') return 1;
        if (c == '\\') {
            if (s->p >= s->end) return 0;
            c = *s->p++;
            if (!strchr("\"\\/bfnrt", c) || c == 0) return 0;
        } else if (c < 0x20 || c > 0x7e) {
            return 0;
        }
    }
    return 0;
}

static int scan_digits(scan_t *s) {
    const unsigned char *start = s->p;
    while (s->p < s->end && *s->p >= '0' && *s->p <= '9') s->p++;
    return s->p > start;
}

static int scan_number(scan_t *s) {
    if (s->p < s->end && *s->p == '-') s->p++;
    if (s->p >= s->end) return 0;
    if (*s->p == '0') {
        s->p++;
    } else if (!scan_digits(s)) {
        return 0;
    }
    if (s->p < s->end && *s->p == '.') {
        s->p++;
        if (!scan_digits(s)) return 0;
    }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-')) s->p++;
        if (!scan_digits(s)) return 0;
    }
    return 1;
}

static int scan_literal(scan_t *s, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0) return 0;
    s->p += n;
    return 1;
}

static int scan_value(scan_t *s, int depth) {
    skip_ws(s);
    if (s->p >= s->end) return 0;
    switch (*s->p) {
        case '"':
            return scan_string(s);
        case 't':
            return scan_literal(s, "true");
        case 'f':
            return scan_literal(s, "false");
        case 'n':
            return scan_literal(s, "null");
        case '{':
        case '[': {
            unsigned char close = *s->p == '{' ? '}' : ']';
            int object = close == '}';
            if (depth >= MAX_SCHEMA_DEPTH) return 0;
            s->p++;
            skip_ws(s);
            if (s->p < s->end && *s->p == close) {
                s->p++;
                return 1;
            }
            for (;;) {
                if (object) {
                    skip_ws(s);
                    if (!scan_string(s)) return 0;
                    skip_ws(s);
                    if (s->p >= s->end || *s->p != ':') return 0;
                    s->p++;
                }
                if (!scan_value(s, depth + 1)) return 0;
                skip_ws(s);
                if (s->p >= s->end) return 0;
                if (*s->p == ',') {
                    s->p++;
                    continue;
                }
                if (*s->p == close) {
                    s->p++;
                    return 1;
                }
                return 0;
            }
        }
        default:
            return scan_number(s);
    }
}

static int expect(scan_t *s, const char *token) {
    skip_ws(s);
    return scan_literal(s, token);
}

/* Prefixes `{"schema": S, "payload":` already checked: a topic's messages all
 * carry the same schema, so most messages are one memcmp instead of a scan. */
#define PREFIX_SLOTS 16
#define PREFIX_MAX 8192
static struct {
    unsigned char *bytes;
    Py_ssize_t len;
} prefixes[PREFIX_SLOTS];
static int prefix_next;

static Py_ssize_t known_prefix(const unsigned char *data, Py_ssize_t size) {
    for (int i = 0; i < PREFIX_SLOTS; i++) {
        Py_ssize_t n = prefixes[i].len;
        if (n > 0 && n < size && memcmp(data, prefixes[i].bytes, (size_t)n) == 0) return n;
    }
    return -1;
}

static void remember_prefix(const unsigned char *data, Py_ssize_t n) {
    if (n > PREFIX_MAX) return;
    unsigned char *copy = PyMem_Malloc((size_t)n);
    if (copy == NULL) return; /* only a cache */
    memcpy(copy, data, (size_t)n);
    PyMem_Free(prefixes[prefix_next].bytes);
    prefixes[prefix_next].bytes = copy;
    prefixes[prefix_next].len = n;
    prefix_next = (prefix_next + 1) % PREFIX_SLOTS;
}

static PyObject *payload_span(PyObject *Py_UNUSED(module), PyObject *value) {
    if (!PyBytes_CheckExact(value)) Py_RETURN_NONE;
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(value);
    Py_ssize_t size = PyBytes_GET_SIZE(value);
    scan_t s = {data, data + size};
    Py_ssize_t known = known_prefix(data, size);
    if (known > 0) {
        s.p = data + known;
    } else {
        if (!expect(&s, "{") || !expect(&s, "\"schema\"") || !expect(&s, ":") || !scan_value(&s, 1) ||
            !expect(&s, ",") || !expect(&s, "\"payload\"") || !expect(&s, ":"))
            Py_RETURN_NONE;
        remember_prefix(data, s.p - data);
    }
    const unsigned char *start = s.p;
    const unsigned char *end = s.end;
    while (end > start && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\n' || end[-1] == '\r')) end--;
    if (end <= start || end[-1] != '}') Py_RETURN_NONE;
    end--; /* the envelope's closing brace; the caller parses [start, end) as one JSON value */
    return Py_BuildValue("(nn)", (Py_ssize_t)(start - data), (Py_ssize_t)(end - data));
}

/* ---------------------------------------------------------------------- walk */

/* The wrapped value of a one-key wrapper, decoded here; NULL without an exception
 * set means "not in the usual form: ask the Python handler". */
typedef PyObject *(*fast_fn)(PyObject *v);

/* An ASCII str's bytes, or NULL. */
static const char *ascii(PyObject *v, Py_ssize_t *n) {
    if (!PyUnicode_CheckExact(v) || !PyUnicode_IS_ASCII(v)) return NULL;
    *n = PyUnicode_GET_LENGTH(v);
    return (const char *)PyUnicode_DATA(v);
}

/* "-?[0-9]{1,18}" -> its value. */
static int small_int(PyObject *v, long long *out) {
    Py_ssize_t n;
    const char *s = ascii(v, &n);
    if (s == NULL) return 0;
    int neg = n > 0 && s[0] == '-';
    if (n - neg < 1 || n - neg > 18) return 0;
    long long x = 0;
    for (Py_ssize_t i = neg; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return 0;
        x = x * 10 + (s[i] - '0');
    }
    *out = neg ? -x : x;
    return 1;
}

static PyObject *fast_int32(PyObject *v) {
    long long x;
    if (!small_int(v, &x) || x < INT32_MIN || x > INT32_MAX) return NULL;
    return PyLong_FromLongLong(x);
}

static PyObject *fast_int64(PyObject *v) {
    long long x;
    if (!small_int(v, &x)) return NULL;
    return PyLong_FromLongLong(x);
}

/* extjson._DOUBLE_RE: -?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)? */
static PyObject *fast_double(PyObject *v) {
    Py_ssize_t n;
    const char *s = ascii(v, &n);
    if (s == NULL || n == 0 || n > 64) return NULL;
    Py_ssize_t i = 0, d = 0;
    if (s[i] == '-') i++;
    while (i < n && s[i] >= '0' && s[i] <= '9') i++, d++;
    if (i < n && s[i] == '.') {
        i++;
        while (i < n && s[i] >= '0' && s[i] <= '9') i++, d++;
    }
    if (d == 0) return NULL;
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-')) i++;
        Py_ssize_t e = 0;
        while (i < n && s[i] >= '0' && s[i] <= '9') i++, e++;
        if (e == 0) return NULL;
    }
    if (i != n) return NULL;
    double x = PyOS_string_to_double(s, NULL, NULL); /* what float(str) uses */
    if (x == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return NULL;
    }
    return PyFloat_FromDouble(x);
}

/* 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z in ms since the epoch: datetime's range. */
#define MIN_MS (-62135596800000LL)
#define MAX_MS (253402300799999LL)

/* _EPOCH + timedelta(milliseconds=ms), for ms in datetime's range. */
static PyObject *date_of_ms(long long ms) {
    if (ms < MIN_MS || ms > MAX_MS) return NULL;
    long long days = ms / 86400000LL, rem = ms % 86400000LL;
    if (rem < 0) rem += 86400000LL, days -= 1;
    /* civil_from_days (H. Hinnant) */
    long long z = days + 719468;
    long long era = (z >= 0 ? z : z - 146096) / 146097;
    long long doe = z - era * 146097;
    long long yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    long long y = yoe + era * 400;
    long long doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    long long mp = (5 * doy + 2) / 153;
    long long d = doy - (153 * mp + 2) / 5 + 1;
    long long m = mp < 10 ? mp + 3 : mp - 9;
    if (m <= 2) y += 1;
    int ms_of_day = (int)rem;
    return PyDateTimeAPI->DateTime_FromDateAndTime(
        (int)y, (int)m, (int)d, ms_of_day / 3600000, ms_of_day / 60000 % 60, ms_of_day / 1000 % 60,
        ms_of_day % 1000 * 1000, PyDateTime_TimeZone_UTC, PyDateTimeAPI->DateTimeType);
}

/* No fast_fn runs Python code: the caller holds no references while it runs. */
static PyObject *fast_date(PyObject *v) {
    long long ms;
    if (PyDict_CheckExact(v)) {
        /* {"$numberLong": "<ms>"}, its key a str: a lookup could call a key's __eq__ */
        if (PyDict_GET_SIZE(v) != 1) return NULL;
        Py_ssize_t pos = 0;
        PyObject *k, *inner;
        PyDict_Next(v, &pos, &k, &inner);
        Py_ssize_t n;
        const char *s = ascii(k, &n);
        if (s == NULL || n != 11 || memcmp(s, "$numberLong", 11) != 0 || !small_int(inner, &ms)) return NULL;
    } else if (PyLong_CheckExact(v)) {
        int overflow;
        ms = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow || (ms == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return NULL;
        }
    } else {
        return NULL;
    }
    return date_of_ms(ms);
}

static const struct {
    const char *key;
    fast_fn fn;
} FAST[] = {
    /* not $oid: an ObjectId is a str subclass (dataflow.model.ObjectId), made in Python */
    {"$date", fast_date},
    {"$numberInt", fast_int32},
    {"$numberLong", fast_int64},
    {"$numberDouble", fast_double},
};

static fast_fn fast_for(PyObject *key) {
    Py_ssize_t n;
    const char *s = ascii(key, &n);
    if (s == NULL || n < 4 || s[0] != '$') return NULL;
    for (size_t i = 0; i < sizeof FAST / sizeof FAST[0]; i++)
        if ((size_t)n == strlen(FAST[i].key) && memcmp(s, FAST[i].key, (size_t)n) == 0) return FAST[i].fn;
    return NULL;
}

static int has_dollar_key(PyObject *d) {
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(d, &pos, &k, &v)) {
        if (!PyUnicode_Check(k)) return 1; /* cannot come from JSON; let Python decide */
        if (PyUnicode_GET_LENGTH(k) > 0 && PyUnicode_READ_CHAR(k, 0) == '$') return 1;
    }
    return 0;
}

typedef struct {
    PyObject **items;
    Py_ssize_t n, cap;
} stack_t;

static int push(stack_t *st, PyObject *o) {
    if (st->n == st->cap) {
        Py_ssize_t cap = st->cap ? st->cap * 2 : 64;
        PyObject **items = PyMem_Realloc(st->items, (size_t)cap * sizeof(PyObject *));
        if (items == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        st->items = items;
        st->cap = cap;
    }
    st->items[st->n++] = Py_NewRef(o);
    return 0;
}

/* What the dict v, a value in a container, becomes: 1 with *out a new reference to
 * its replacement, 0 to leave it as it is (pushed when it is a document to walk), -1
 * on error. The caller holds a reference to v: a handler or classify may take v out
 * of its container. */
/* Whether a str key holds a NUL character (no Python code runs). */
static int has_nul(PyObject *k) {
    if (!PyUnicode_CheckExact(k)) return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(k);
    if (PyUnicode_KIND(k) == PyUnicode_1BYTE_KIND) return memchr(PyUnicode_DATA(k), 0, (size_t)n) != NULL;
    Py_ssize_t at = PyUnicode_FindChar(k, 0, 0, n, 1);
    if (at == -2) PyErr_Clear();
    return at >= 0;
}

/* 1 when an exact int does not fit int64 (BSON's widest integer), 0 when it does, -1 on error. */
static int past_int64(PyObject *v) {
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred()) return -1;
    return overflow != 0;
}

static int visit(PyObject *v, PyObject *handlers, PyObject *classify, PyObject *plain, stack_t *st,
                 PyObject **out) {
    if (PyDict_GET_SIZE(v) == 1) {
        Py_ssize_t pos = 0;
        PyObject *wk, *wv;
        PyDict_Next(v, &pos, &wk, &wv);
        fast_fn fast = fast_for(wk);
        if (fast != NULL) {
            PyObject *r = fast(wv);
            if (r != NULL) {
                *out = r;
                return 1;
            }
            if (PyErr_Occurred()) return -1;
        }
        /* Python code from here on (the lookup hashes wk when it is not a str), which may
         * empty v: hold its key and value. */
        Py_INCREF(wk);
        Py_INCREF(wv);
        PyObject *handler = PyDict_GetItemWithError(handlers, wk);
        if (handler != NULL) {
            Py_INCREF(handler);
            PyObject *args[2] = {wv, v};
            PyObject *r = PyObject_Vectorcall(handler, args, 2, NULL);
            Py_DECREF(handler);
            Py_DECREF(wk);
            Py_DECREF(wv);
            if (r == NULL) return -1;
            *out = r; /* whatever it is, as `_walk` stores it (the plain marker too) */
            return 1;
        }
        Py_DECREF(wk);
        Py_DECREF(wv);
        if (PyErr_Occurred()) return -1;
    }
    if (has_dollar_key(v)) {
        PyObject *r = PyObject_CallOneArg(classify, v);
        if (r == NULL) return -1;
        if (r != plain) {
            *out = r;
            return 1;
        }
        Py_DECREF(r);
    }
    /* `if v: push(v)` after classify, which may have changed v */
    if (PyDict_GET_SIZE(v) > 0 && push(st, v) < 0) return -1;
    return 0;
}

static PyObject *walk(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "walk(root, handlers, classify, plain)");
        return NULL;
    }
    PyObject *root = args[0], *handlers = args[1], *classify = args[2], *plain = args[3];
    if (!PyDict_CheckExact(handlers)) {
        PyErr_SetString(PyExc_TypeError, "handlers must be a dict");
        return NULL;
    }
    stack_t st = {NULL, 0, 0};
    /* What BSON cannot hold, noted for the caller: an integer past int64 (orjson reads up
     * to 2**64 - 1), a NUL in a field name (BSON keys are C strings). */
    int failed = 0, wide = 0, nul = 0;
    if (push(&st, root) < 0) return NULL;
    /* Only a dict value can lead to Python code (a handler, classify, a key's __hash__
     * or a value's __del__ while storing): only there are references taken, and the
     * container checked afterwards, as Python's own iteration would. */
    while (st.n > 0 && !failed) {
        PyObject *c = st.items[--st.n]; /* the stack's reference */
        if (PyDict_CheckExact(c)) {
            Py_ssize_t pos = 0, size = PyDict_GET_SIZE(c);
            PyObject *k, *v;
            while (PyDict_Next(c, &pos, &k, &v)) {
                if (!nul && has_nul(k)) nul = 1;
                if (!PyDict_CheckExact(v)) {
                    if (PyList_CheckExact(v) && PyList_GET_SIZE(v) > 0 && push(&st, v) < 0) {
                        failed = 1;
                        break;
                    }
                    if (!wide && PyLong_CheckExact(v) && (wide = past_int64(v)) < 0) {
                        failed = 1;
                        break;
                    }
                    continue;
                }
                Py_INCREF(k);
                Py_INCREF(v);
                PyObject *r;
                int rc = visit(v, handlers, classify, plain, &st, &r);
                if (rc > 0) {
                    rc = PyDict_SetItem(c, k, r);
                    Py_DECREF(r);
                }
                Py_DECREF(k);
                Py_DECREF(v);
                if (rc == 0 && PyDict_GET_SIZE(c) != size) {
                    PyErr_SetString(PyExc_RuntimeError, "dictionary changed size during iteration");
                    rc = -1;
                }
                if (rc < 0) {
                    failed = 1;
                    break;
                }
            }
        } else if (PyList_CheckExact(c)) {
            for (Py_ssize_t i = 0; i < PyList_GET_SIZE(c); i++) { /* its size read again each time */
                PyObject *v = PyList_GET_ITEM(c, i);
                if (!PyDict_CheckExact(v)) {
                    if (PyList_CheckExact(v) && PyList_GET_SIZE(v) > 0 && push(&st, v) < 0) {
                        failed = 1;
                        break;
                    }
                    if (!wide && PyLong_CheckExact(v) && (wide = past_int64(v)) < 0) {
                        failed = 1;
                        break;
                    }
                    continue;
                }
                Py_INCREF(v);
                PyObject *r;
                int rc = visit(v, handlers, classify, plain, &st, &r);
                if (rc > 0) rc = PyList_SetItem(c, i, r); /* steals r; IndexError if c shrank */
                Py_DECREF(v);
                if (rc < 0) {
                    failed = 1;
                    break;
                }
            }
        }
        Py_DECREF(c);
    }
    while (st.n > 0) Py_DECREF(st.items[--st.n]);
    PyMem_Free(st.items);
    if (failed) return NULL;
    if (wide) return PyUnicode_FromString("int64");
    if (nul) return PyUnicode_FromString("nul");
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ names_ok */

/* True when every key of the dict is a non-empty str without NUL; False means
 * "let validate.check_field_names look": it words the error. */
static PyObject *names_ok(PyObject *Py_UNUSED(module), PyObject *d) {
    if (!PyDict_CheckExact(d)) Py_RETURN_FALSE;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(d, &pos, &k, &v)) {
        if (!PyUnicode_CheckExact(k)) Py_RETURN_FALSE;
        Py_ssize_t n = PyUnicode_GET_LENGTH(k);
        if (n == 0) Py_RETURN_FALSE;
        if (PyUnicode_KIND(k) == PyUnicode_1BYTE_KIND) {
            if (memchr(PyUnicode_DATA(k), 0, (size_t)n) != NULL) Py_RETURN_FALSE;
        } else {
            Py_ssize_t at = PyUnicode_FindChar(k, 0, 0, n, 1);
            if (at == -2) PyErr_Clear(); /* let the Python check see it */
            if (at != -1) Py_RETURN_FALSE;
        }
    }
    Py_RETURN_TRUE;
}

/* ------------------------------------------------------------------- columns */

/* Row i's value v of field k into the columns, where Python code may run: the
 * lookups may call k's __hash__ and __eq__ (or those of a key already in values),
 * the comparison with skip k's __eq__, adding type(v) to a set its metaclass's
 * __hash__ and __eq__, a new column a garbage collection, and that code may change
 * the row. So the caller holds k and v, and the column and the type set are held. */
static int put(PyObject *values, PyObject *types, PyObject *k, PyObject *v, Py_ssize_t i, Py_ssize_t n,
               PyObject *skip) {
    PyObject *col = PyDict_GetItemWithError(values, k), *seen;
    if (col == NULL) {
        if (PyErr_Occurred()) return -1;
        int is_skip = PyObject_RichCompareBool(k, skip, Py_EQ);
        if (is_skip < 0) return -1;
        if (is_skip) return 0;
        col = PyList_New(n);
        if (col == NULL) return -1;
        for (Py_ssize_t j = 0; j < n; j++) PyList_SET_ITEM(col, j, Py_NewRef(Py_None));
        seen = PySet_New(NULL);
        if (seen == NULL || PyDict_SetItem(values, k, col) < 0 || PyDict_SetItem(types, k, seen) < 0) {
            Py_DECREF(col);
            Py_XDECREF(seen);
            return -1;
        }
    } else {
        Py_INCREF(col);
        seen = PyDict_GetItemWithError(types, k);
        if (seen == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_RuntimeError, "a field name's __hash__ or __eq__ changed its answer");
            Py_DECREF(col);
            return -1;
        }
        Py_INCREF(seen);
    }
    int rc = 0;
    if (i >= PyList_GET_SIZE(col)) {
        /* rows grew during the call: `col[i] = v` in field_values fails so */
        PyErr_SetString(PyExc_IndexError, "list assignment index out of range");
        rc = -1;
    } else {
        PyObject *old = PyList_GET_ITEM(col, i);
        PyList_SET_ITEM(col, i, Py_NewRef(v));
        Py_DECREF(old);
        if (v != Py_None) rc = PySet_Add(seen, (PyObject *)Py_TYPE(v));
    }
    Py_DECREF(col);
    Py_DECREF(seen);
    return rc;
}

/* arrow_convert.field_values and the type sets field_kinds reads, in one pass:
 * (values, types) with values {field: [value or None] * n} in order of first
 * appearance (skip left out) and types {field: {type(v) for v not None}}.
 * None when a row is not a dict: the Python functions then do it.
 *
 * Python code called from here (see put) may change rows and the row being read:
 * as in field_values, rows is read up to its size of the moment, a row that changes
 * size is a RuntimeError, and a row that became something other than a dict is
 * left to the Python functions (None). */
static PyObject *columns(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "columns(rows: list, n: int, skip: str)");
        return NULL;
    }
    PyObject *rows = args[0], *skip = args[2];
    Py_ssize_t n = PyLong_AsSsize_t(args[1]);
    if (n == -1 && PyErr_Occurred()) return NULL;
    Py_ssize_t count = PyList_GET_SIZE(rows);
    if (count > n) {
        PyErr_SetString(PyExc_ValueError, "more rows than n");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++)
        if (!PyDict_CheckExact(PyList_GET_ITEM(rows, i))) Py_RETURN_NONE;
    PyObject *values = PyDict_New(), *types = PyDict_New();
    if (values == NULL || types == NULL) goto fail;
    int plain = PyUnicode_CheckExact(skip); /* no key nor type with Python methods met yet */
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(rows); i++) {
        PyObject *row = PyList_GET_ITEM(rows, i);
        if (!PyDict_CheckExact(row)) {
            Py_DECREF(values);
            Py_DECREF(types);
            Py_RETURN_NONE;
        }
        Py_INCREF(row);
        Py_ssize_t pos = 0, size = PyDict_GET_SIZE(row);
        PyObject *k, *v;
        int rc = 0;
        while (PyDict_Next(row, &pos, &k, &v)) {
            if (plain && PyUnicode_CheckExact(k)) {
                /* The usual case, where no Python code runs: a str key looked up among str
                 * keys, an existing column, and (below) a type whose hash and equality are type's. */
                PyObject *col = PyDict_GetItemWithError(values, k);
                if (col != NULL && i < PyList_GET_SIZE(col)) {
                    PyObject *old = PyList_GET_ITEM(col, i); /* None: str keys are unique in a row */
                    PyList_SET_ITEM(col, i, Py_NewRef(v));   /* col holds v from here on */
                    Py_DECREF(old);
                    if (v == Py_None) continue;
                    PyObject *seen = PyDict_GetItemWithError(types, k);
                    if (seen == NULL) {
                        if (!PyErr_Occurred()) PyErr_SetString(PyExc_SystemError, "columns: no type set");
                        rc = -1;
                        break;
                    }
                    if (Py_IS_TYPE(Py_TYPE(v), &PyType_Type)) {
                        if ((rc = PySet_Add(seen, (PyObject *)Py_TYPE(v))) < 0) break;
                        continue;
                    }
                    /* a metaclass: its __hash__ and __eq__ may be Python code */
                    plain = 0;
                    Py_INCREF(seen);
                    rc = PySet_Add(seen, (PyObject *)Py_TYPE(v));
                    Py_DECREF(seen);
                    if (rc == 0 && PyDict_GET_SIZE(row) != size) {
                        PyErr_SetString(PyExc_RuntimeError, "dictionary changed size during iteration");
                        rc = -1;
                    }
                    if (rc < 0) break;
                    continue;
                }
                if (col == NULL) {
                    if (PyErr_Occurred()) {
                        rc = -1;
                        break;
                    }
                    int is_skip = PyObject_RichCompareBool(k, skip, Py_EQ); /* two str */
                    if (is_skip != 0) {
                        if ((rc = is_skip) < 0) break;
                        rc = 0;
                        continue;
                    }
                }
            } else {
                plain = 0; /* values may now hold a key with Python methods */
            }
            Py_INCREF(k);
            Py_INCREF(v);
            rc = put(values, types, k, v, i, n, skip);
            Py_DECREF(k);
            Py_DECREF(v);
            if (rc == 0 && PyDict_GET_SIZE(row) != size) {
                PyErr_SetString(PyExc_RuntimeError, "dictionary changed size during iteration");
                rc = -1;
            }
            if (rc < 0) break;
        }
        Py_DECREF(row);
        if (rc < 0) goto fail;
    }
    return Py_BuildValue("(NN)", values, types);
fail:
    Py_XDECREF(values);
    Py_XDECREF(types);
    return NULL;
}

/* ------------------------------------------------------------- json_elements */

/* Split orjson's text of a list into the text of each element: (texts, suspects).
 * texts[i] is the bytes of element i, or None when it is `null`; suspects lists
 * the i whose text is `null` or holds "null" anywhere (orjson writes NaN and
 * Infinity as null, so the caller redoes those one by one). None when the text
 * is not a JSON array as expected. */
static PyObject *json_elements(PyObject *Py_UNUSED(module), PyObject *buf) {
    if (!PyBytes_CheckExact(buf)) Py_RETURN_NONE;
    const char *s = PyBytes_AS_STRING(buf);
    Py_ssize_t n = PyBytes_GET_SIZE(buf);
    if (n < 2 || s[0] != '[' || s[n - 1] != ']') Py_RETURN_NONE;
    PyObject *texts = PyList_New(0), *suspects = PyList_New(0);
    if (texts == NULL || suspects == NULL) goto fail;
    if (n == 2) return Py_BuildValue("(NN)", texts, suspects);
    Py_ssize_t start = 1, depth = 0;
    int in_string = 0;
    for (Py_ssize_t i = 1; i < n; i++) {
        char c = s[i];
        if (in_string) {
            if (c == '\\') i++;
            else if (c == '"') in_string = 0;
            continue;
        }
        if (c == '"') {
            in_string = 1;
        } else if (c == '{' || c == '[') {
            depth++;
        } else if ((c == '}' || c == ']') && depth > 0) {
            depth--;
        } else if ((c == ',' && depth == 0) || (c == ']' && depth == 0 && i == n - 1)) {
            Py_ssize_t len = i - start;
            if (len <= 0) goto not_array;
            const char *e = s + start;
            int is_null = len == 4 && memcmp(e, "null", 4) == 0;
            PyObject *item = is_null ? Py_NewRef(Py_None) : PyBytes_FromStringAndSize(e, len);
            if (item == NULL) goto fail;
            Py_ssize_t index = PyList_GET_SIZE(texts);
            int rc = PyList_Append(texts, item);
            Py_DECREF(item);
            if (rc < 0) goto fail;
            int suspect = is_null;
            for (Py_ssize_t j = 0; !suspect && j + 4 <= len; j++) suspect = memcmp(e + j, "null", 4) == 0;
            if (suspect) {
                PyObject *ix = PyLong_FromSsize_t(index);
                if (ix == NULL) goto fail;
                rc = PyList_Append(suspects, ix);
                Py_DECREF(ix);
                if (rc < 0) goto fail;
            }
            start = i + 1;
        } else if (c == ']' || c == '}') {
            goto not_array; /* unbalanced */
        }
    }
    if (in_string || depth != 0 || start != n) goto not_array;
    return Py_BuildValue("(NN)", texts, suspects);
not_array:
    Py_DECREF(texts);
    Py_DECREF(suspects);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(texts);
    Py_XDECREF(suspects);
    return NULL;
}

/* ------------------------------------------------------------- timestamps_us */

static long long days_from_civil(long long y, unsigned m, unsigned d) {
    y -= m <= 2;
    long long era = (y >= 0 ? y : y - 399) / 400;
    unsigned yoe = (unsigned)(y - era * 400);
    unsigned doy = (153 * (m > 2 ? m - 3 : m + 9) + 2) / 5 + d - 1;
    unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (long long)doe - 719468;
}

/* A timestamp[us, UTC] column's buffers from datetimes in UTC (or None):
 * (values: bytes of int64 microseconds since the epoch, validity: bytes | None,
 * null_count). None when any value is something else (another time zone, a
 * naive datetime, a subclass): the caller lets pyarrow convert them. */
static PyObject *timestamps_us(PyObject *Py_UNUSED(module), PyObject *values) {
    if (!PyList_CheckExact(values)) Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(values), nulls = 0;
    PyObject *data = PyBytes_FromStringAndSize(NULL, n * 8);
    PyObject *valid = PyBytes_FromStringAndSize(NULL, (n + 7) / 8);
    if (data == NULL || valid == NULL) {
        Py_XDECREF(data);
        Py_XDECREF(valid);
        return NULL;
    }
    int64_t *out = (int64_t *)PyBytes_AS_STRING(data);
    unsigned char *bits = (unsigned char *)PyBytes_AS_STRING(valid);
    memset(bits, 0, (size_t)(n + 7) / 8);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyList_GET_ITEM(values, i);
        if (v == Py_None) {
            out[i] = 0;
            nulls++;
            continue;
        }
        if (!PyDateTime_CheckExact(v) || PyDateTime_DATE_GET_TZINFO(v) != PyDateTime_TimeZone_UTC) {
            Py_DECREF(data);
            Py_DECREF(valid);
            Py_RETURN_NONE;
        }
        long long days = days_from_civil(PyDateTime_GET_YEAR(v), (unsigned)PyDateTime_GET_MONTH(v),
                                         (unsigned)PyDateTime_GET_DAY(v));
        long long secs = days * 86400LL + PyDateTime_DATE_GET_HOUR(v) * 3600LL +
                         PyDateTime_DATE_GET_MINUTE(v) * 60LL + PyDateTime_DATE_GET_SECOND(v);
        out[i] = secs * 1000000LL + PyDateTime_DATE_GET_MICROSECOND(v);
        bits[i / 8] |= (unsigned char)(1u << (i % 8));
    }
    if (nulls == 0) {
        Py_DECREF(valid);
        valid = Py_NewRef(Py_None);
    }
    return Py_BuildValue("(NNn)", data, valid, nulls);
}

/* -------------------------------------------------------------------- module */

static PyMethodDef methods[] = {
    {"payload_span", (PyCFunction)payload_span, METH_O,
     "payload_span(value: bytes) -> (start, end) | None: the payload of {\"schema\": .., \"payload\": ..}"},
    {"columns", (PyCFunction)(void (*)(void))columns, METH_FASTCALL,
     "columns(rows: list[dict], n: int, skip: str) -> (values, types) | None"},
    {"json_elements", (PyCFunction)json_elements, METH_O,
     "json_elements(buf: bytes) -> (texts, suspects) | None: orjson's list text split per element"},
    {"names_ok", (PyCFunction)names_ok, METH_O,
     "names_ok(d: dict) -> bool: every key a non-empty str without NUL"},
    {"timestamps_us", (PyCFunction)timestamps_us, METH_O,
     "timestamps_us(values: list) -> (data, validity, null_count) | None: UTC datetimes as int64 us"},
    {"walk", (PyCFunction)(void (*)(void))walk, METH_FASTCALL,
     "walk(root, handlers, classify, plain) -> None, or 'int64' / 'nul' when it met an integer "
     "past int64 / a NUL in a field name: extjson._walk, natively"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_speedups", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__speedups(void) {
    PyDateTime_IMPORT;
    if (PyDateTimeAPI == NULL) return NULL;
    return PyModule_Create(&module);
}
