/* An SSE load generator cheap enough not to be the bottleneck (one thread, epoll).
 *
 * It opens --conns connections to 127.0.0.1:--port, GET --path (each "%d" replaced by the
 * connection's stream index, i % --streams), and reads Server-Sent Events. Every token in an
 * event's data looks like "s=<sequence> t=<publish time, ns since the epoch>"; an event may carry
 * several (coalescing). Per connection it checks that sequence numbers run on with no gap and no
 * duplicate (across reconnects too), and it keeps a latency histogram of now - t.
 *
 * Modes, combinable: --churn-every K (each connection drops after K tokens and resumes with
 * Last-Event-ID), --storm-at S (S seconds after all are connected, every connection drops at once
 * and resumes with Last-Event-ID; "back" is when it first receives a token published after it
 * reconnected), --slow-fraction F (that share of connections reads about one event per second).
 *
 * It prints "READY <connected>" on stderr once every connection got its response headers (the
 * publisher starts then), and one JSON object of results on stdout when every connection has
 * received --expect tokens of its stream (or was ended by the server), or after --duration s.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define LINE_MAX_LEN 65536
#define ID_MAX_LEN 128
#define BUCKET_US 10
#define BUCKETS 1000000 /* 10 s at 10 us */

enum { ST_IDLE, ST_CONNECTING, ST_HEADERS, ST_BODY, ST_DONE };
enum { CH_SIZE, CH_DATA, CH_CRLF, CH_NONE };

typedef struct {
    int fd, state, stream, slow, chunked, chunk_state, has_data;
    long chunk_left;
    long long next_seq;  /* -1: not known yet */
    long long tokens;    /* tokens received by this connection */
    long long since_churn;
    double reconnected_at; /* storm: when it reconnected; 0 when it is back */
    char last_id[ID_MAX_LEN];
    char pending_id[ID_MAX_LEN];
    char *head; int head_len; /* response headers being read */
    char *line; int line_len;
} Conn;

typedef struct { uint32_t *b; uint64_t n, over; double max_us; } Hist;

static Conn *conns;
static int nconns, nstreams = 1, port, epfd;
static const char *path_tpl = "/";
static char **paths; /* --paths FILE: stream i's path is line i */
static const char *first_id = NULL;
static long long expect = 0, churn_every = 0;
static double duration = 30, storm_at = -1, slow_fraction = 0;
static int inflight_max = 256;
static long long events, tokens, bytes_in, gaps, dups, errors, ended, done_conns, reconnects;
static long long statuses[6];
static Hist lat, slow_lat, back, first;
static int inflight, ready_said;

static double now_s(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}
static long long wall_ns(void) {
    struct timespec ts; clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
static double cpu_s(void) {
    struct rusage ru; getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}
static void hist_add(Hist *h, double us) {
    if (us < 0) us = 0;
    uint64_t i = (uint64_t)(us / BUCKET_US);
    if (i >= BUCKETS) h->over++; else h->b[i]++;
    h->n++;
    if (us > h->max_us) h->max_us = us;
}
static double hist_pct(Hist *h, double p) {
    if (!h->n) return -1;
    uint64_t want = (uint64_t)(p * h->n), seen = 0;
    if (want >= h->n) want = h->n - 1;
    for (uint64_t i = 0; i < BUCKETS; i++) {
        seen += h->b[i];
        if (seen > want) return (i + 0.5) * BUCKET_US;
    }
    return h->max_us;
}
static void hist_json(const char *name, Hist *h, double scale, const char *sep) {
    printf("\"%s\":{\"n\":%llu,\"p50\":%.3f,\"p99\":%.3f,\"p999\":%.3f,\"max\":%.3f}%s", name,
           (unsigned long long)h->n, hist_pct(h, .5) / scale, hist_pct(h, .99) / scale,
           hist_pct(h, .999) / scale, h->max_us / scale, sep);
}

static void start(Conn *c);

static void finish(Conn *c, int done) {
    if (c->fd >= 0) { close(c->fd); c->fd = -1; }
    if (c->state == ST_CONNECTING || c->state == ST_HEADERS) inflight--;
    c->state = ST_DONE;
    if (done) done_conns++; else ended++;
}

static void drop_and_resume(Conn *c) {
    if (c->fd >= 0) { close(c->fd); c->fd = -1; }
    if (c->state == ST_CONNECTING || c->state == ST_HEADERS) inflight--;
    c->state = ST_IDLE;
    reconnects++;
    start(c);
}

static void on_token(Conn *c, long long seq, long long t_ns, long long now_ns) {
    tokens++; c->tokens++;
    if (c->next_seq >= 0) {
        if (seq < c->next_seq) { dups++; return; }
        if (seq > c->next_seq) gaps += seq - c->next_seq;
    }
    c->next_seq = seq + 1;
    double us = (now_ns - t_ns) / 1000.0;
    hist_add(c->slow ? &slow_lat : &lat, us);
    if (seq == 0) hist_add(&first, us); /* the first token of the stream */
    if (c->reconnected_at > 0 && t_ns >= (long long)(c->reconnected_at * 1e9)) {
        /* reconnected_at is on the wall clock, like t */
        hist_add(&back, (now_ns / 1e9 - c->reconnected_at) * 1e6);
        c->reconnected_at = 0;
    }
}

static void on_line(Conn *c, char *line, int len) {
    if (len == 0) { /* dispatch: an event is a frame with data (not a retry hint) */
        int had_data = c->has_data;
        if (had_data) events++;
        c->has_data = 0;
        if (c->pending_id[0]) strcpy(c->last_id, c->pending_id);
        c->pending_id[0] = 0;
        /* Churn after the event is complete (as EventSource, the id counts from dispatch). */
        if (had_data && churn_every && ++c->since_churn >= churn_every) {
            c->since_churn = 0;
            drop_and_resume(c);
        }
        return;
    }
    if (len >= 3 && !memcmp(line, "id:", 3)) {
        int off = (len > 3 && line[3] == ' ') ? 4 : 3;
        int n = len - off;
        if (n >= ID_MAX_LEN) n = ID_MAX_LEN - 1;
        memcpy(c->pending_id, line + off, n); c->pending_id[n] = 0;
        return;
    }
    if (len >= 5 && !memcmp(line, "data:", 5)) {
        long long now_ns = wall_ns();
        c->has_data = 1;
        line[len] = 0;
        char *p = line;
        while ((p = strstr(p, "s=")) != NULL) {
            char *end;
            long long seq = strtoll(p + 2, &end, 10);
            if (end == p + 2) { p += 2; continue; }
            char *t = strstr(end, "t=");
            if (!t) break;
            long long t_ns = strtoll(t + 2, &end, 10);
            on_token(c, seq, t_ns, now_ns);
            p = end;
        }
        if (expect && c->next_seq >= expect) { events++; finish(c, 1); return; }
    }
}

/* Feeds de-chunked body bytes to the line parser. Returns 0 when the connection was replaced. */
static int feed_sse(Conn *c, const char *p, long n) {
    int fd = c->fd;
    for (long i = 0; i < n; i++) {
        char ch = p[i];
        if (ch == '\n') {
            int len = c->line_len;
            if (len && c->line[len - 1] == '\r') len--;
            c->line_len = 0;
            on_line(c, c->line, len);
            if (c->fd != fd || c->state != ST_BODY) return 0;
        } else if (c->line_len < LINE_MAX_LEN - 1) {
            c->line[c->line_len++] = ch;
        }
    }
    return 1;
}

static int feed_body(Conn *c, const char *p, long n) {
    if (!c->chunked) return feed_sse(c, p, n);
    long i = 0;
    while (i < n) {
        if (c->chunk_state == CH_SIZE) {
            char ch = p[i++];
            if (ch == '\n') {
                if (c->chunk_left == 0) { finish(c, 0); return 0; } /* last chunk */
                c->chunk_state = CH_DATA;
            } else if (ch != '\r') {
                int v = (ch >= '0' && ch <= '9') ? ch - '0'
                      : (ch >= 'a' && ch <= 'f') ? ch - 'a' + 10
                      : (ch >= 'A' && ch <= 'F') ? ch - 'A' + 10 : -1;
                if (v >= 0) c->chunk_left = c->chunk_left * 16 + v;
                else c->chunk_state = CH_NONE; /* extension: skip to end of line */
            }
        } else if (c->chunk_state == CH_NONE) {
            if (p[i++] == '\n') {
                if (c->chunk_left == 0) { finish(c, 0); return 0; }
                c->chunk_state = CH_DATA;
            }
        } else if (c->chunk_state == CH_DATA) {
            long take = n - i < c->chunk_left ? n - i : c->chunk_left;
            if (!feed_sse(c, p + i, take)) return 0;
            i += take; c->chunk_left -= take;
            if (c->chunk_left == 0) c->chunk_state = CH_CRLF;
        } else { /* CH_CRLF */
            if (p[i++] == '\n') { c->chunk_state = CH_SIZE; c->chunk_left = 0; }
        }
    }
    return 1;
}

static void on_headers(Conn *c) {
    int status = 0;
    sscanf(c->head, "HTTP/1.%*d %d", &status);
    inflight--;
    if (status == 200) statuses[0]++; else if (status == 204) statuses[1]++;
    else if (status >= 400 && status < 500) statuses[2]++; else if (status >= 500) statuses[3]++;
    else statuses[4]++;
    if (status != 200) { finish(c, status == 204); return; }
    c->chunked = strcasestr(c->head, "transfer-encoding: chunked") != NULL;
    c->chunk_state = CH_SIZE; c->chunk_left = 0;
    c->state = ST_BODY;
}

static void on_readable(Conn *c) {
    static char buf[262144];
    for (;;) {
        ssize_t n = read(c->fd, buf, c->slow ? 256 : sizeof buf);
        if (n == 0) { finish(c, 0); return; }
        if (n < 0) {
            if (errno == EAGAIN) return;
            errors++; finish(c, 0); return;
        }
        bytes_in += n;
        long off = 0;
        if (c->state == ST_HEADERS) {
            for (; off < n; off++) {
                if (c->head_len < 8191) c->head[c->head_len++] = buf[off];
                c->head[c->head_len] = 0;
                if (c->head_len >= 4 && !memcmp(c->head + c->head_len - 4, "\r\n\r\n", 4)) {
                    off++;
                    on_headers(c);
                    break;
                }
            }
            if (c->state != ST_BODY) return;
        }
        if (off < n && !feed_body(c, buf + off, n - off)) return;
        if (c->slow) return; /* one small read per tick */
    }
}

static void start(Conn *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) { perror("socket"); exit(2); }
    if (c->slow) { int sz = 4096; setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz); }
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) {
        errors++; close(fd); c->state = ST_DONE; ended++; return;
    }
    c->fd = fd; c->state = ST_CONNECTING; c->head_len = 0; c->line_len = 0;
    c->pending_id[0] = 0; c->has_data = 0;
    inflight++;
    struct epoll_event ev = {.events = EPOLLOUT | (c->slow ? 0 : EPOLLIN), .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
}

static void send_request(Conn *c) {
    char path[1024], req[2048];
    if (paths) snprintf(path, sizeof path, "%s", paths[c->stream]);
    else snprintf(path, sizeof path, path_tpl, c->stream);
    const char *id = c->last_id[0] ? c->last_id : first_id;
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n"
                     "%s%s%s\r\n", path, id ? "Last-Event-ID: " : "", id ? id : "",
                     id ? "\r\n" : "");
    if (write(c->fd, req, n) != n) { errors++; finish(c, 0); return; }
    c->state = ST_HEADERS;
    struct epoll_event ev = {.events = c->slow ? 0 : EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen --port P --path TPL --conns N [--streams S] [--expect K]"
                    " [--last-event-id ID] [--duration S] [--churn-every K] [--storm-at S]"
                    " [--slow-fraction F] [--inflight N] [--paths FILE]\n");
    exit(2);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) usage();
        if (!strcmp(k, "--port")) port = atoi(v);
        else if (!strcmp(k, "--path")) path_tpl = v;
        else if (!strcmp(k, "--conns")) nconns = atoi(v);
        else if (!strcmp(k, "--streams")) nstreams = atoi(v);
        else if (!strcmp(k, "--expect")) expect = atoll(v);
        else if (!strcmp(k, "--last-event-id")) first_id = v;
        else if (!strcmp(k, "--duration")) duration = atof(v);
        else if (!strcmp(k, "--churn-every")) churn_every = atoll(v);
        else if (!strcmp(k, "--storm-at")) storm_at = atof(v);
        else if (!strcmp(k, "--slow-fraction")) slow_fraction = atof(v);
        else if (!strcmp(k, "--inflight")) inflight_max = atoi(v);
        else if (!strcmp(k, "--paths")) {
            FILE *f = fopen(v, "r");
            if (!f) { perror(v); return 2; }
            char l[1024]; int cap = 0; nstreams = 0;
            while (fgets(l, sizeof l, f)) {
                l[strcspn(l, "\r\n")] = 0;
                if (!l[0]) continue;
                if (nstreams == cap) { cap = cap ? cap * 2 : 64; paths = realloc(paths, cap * sizeof *paths); }
                paths[nstreams++] = strdup(l);
            }
            fclose(f);
        }
        else usage();
        i++;
    }
    if (!port || nconns <= 0 || nstreams <= 0) usage();
    struct rlimit rl; getrlimit(RLIMIT_NOFILE, &rl); rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    lat.b = calloc(BUCKETS, 4); slow_lat.b = calloc(BUCKETS, 4); back.b = calloc(BUCKETS, 4);
    first.b = calloc(BUCKETS, 4);
    conns = calloc(nconns, sizeof *conns);
    int slow_every = slow_fraction > 0 ? (int)(1 / slow_fraction + 0.5) : 0;
    for (int i = 0; i < nconns; i++) {
        Conn *c = &conns[i];
        c->fd = -1; c->stream = i % nstreams; c->next_seq = -1; c->state = ST_IDLE;
        c->slow = slow_every && i % slow_every == slow_every - 1;
        c->since_churn = churn_every ? i % churn_every : 0; /* stagger the drops */
        c->head = malloc(8192); c->line = malloc(LINE_MAX_LEN);
    }
    epfd = epoll_create1(0);
    struct epoll_event evs[1024];
    double t0 = now_s(), ready_at = 0, last_slow = 0;
    int next = 0, stormed = 0;
    while (now_s() - t0 < duration) {
        while (next < nconns && inflight < inflight_max) {
            Conn *c = &conns[next++];
            if (c->state == ST_IDLE) start(c);
        }
        if (!ready_said && next == nconns && inflight == 0) {
            long long up = 0;
            for (int i = 0; i < nconns; i++) up += conns[i].state == ST_BODY;
            fprintf(stderr, "READY %lld\n", up); fflush(stderr);
            ready_said = 1; ready_at = now_s();
        }
        if (ready_said && storm_at >= 0 && !stormed && now_s() - ready_at >= storm_at) {
            stormed = 1;
            double wall = wall_ns() / 1e9;
            for (int i = 0; i < nconns; i++) {
                Conn *c = &conns[i];
                if (c->state == ST_DONE) continue;
                c->reconnected_at = wall;
                if (c->fd >= 0) { close(c->fd); c->fd = -1; }
                if (c->state == ST_CONNECTING || c->state == ST_HEADERS) inflight--;
                c->state = ST_IDLE;
                reconnects++;
            }
            /* They reconnect through the same window of connects in flight as the first
             * connections did: as fast as the server accepts them. */
            next = 0;
        }
        if (slow_every && now_s() - last_slow >= 1.0) {
            last_slow = now_s();
            for (int i = 0; i < nconns; i++) {
                Conn *c = &conns[i];
                if (c->slow && (c->state == ST_BODY || c->state == ST_HEADERS)) on_readable(c);
            }
        }
        if (expect && done_conns + ended >= nconns && next == nconns) break;
        if (!expect && ready_said && ended >= nconns) break;
        int n = epoll_wait(epfd, evs, 1024, 10);
        for (int i = 0; i < n; i++) {
            Conn *c = evs[i].data.ptr;
            if (c->fd < 0) continue;
            if (c->state == ST_CONNECTING) {
                int err = 0; socklen_t l = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
                if (err || (evs[i].events & (EPOLLERR | EPOLLHUP))) { errors++; finish(c, 0); continue; }
                send_request(c);
                continue;
            }
            if (c->state == ST_HEADERS || c->state == ST_BODY) on_readable(c);
        }
    }
    long long up = 0, behind = 0;
    for (int i = 0; i < nconns; i++) {
        up += conns[i].state == ST_BODY;
        if (expect && conns[i].next_seq < expect) behind++;
    }
    printf("{\"conns\":%d,\"open_at_end\":%lld,\"finished\":%lld,\"ended_by_server\":%lld,"
           "\"incomplete\":%lld,\"events\":%lld,\"tokens\":%lld,\"bytes\":%lld,\"gaps\":%lld,"
           "\"dups\":%lld,\"errors\":%lld,\"reconnects\":%lld,\"status_200\":%lld,"
           "\"status_204\":%lld,\"status_4xx\":%lld,\"status_5xx\":%lld,\"status_other\":%lld,"
           "\"elapsed_s\":%.3f,\"cpu_s\":%.3f,",
           nconns, up, done_conns, ended, behind, events, tokens, bytes_in, gaps, dups, errors,
           reconnects, statuses[0], statuses[1], statuses[2], statuses[3], statuses[4],
           now_s() - t0, cpu_s());
    hist_json("latency_ms", &lat, 1000, ",");
    hist_json("slow_latency_ms", &slow_lat, 1000, ",");
    hist_json("back_ms", &back, 1000, ",");
    hist_json("first_token_ms", &first, 1000, "}\n");
    return 0;
}
