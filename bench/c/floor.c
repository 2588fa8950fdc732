/* The floor: the least an SSE relay can do. One thread, epoll, no storage, no resume.
 *
 * Clients GET /s/<stream index> (any path; the number after the last '/' picks the stream).
 * Each line "<stream index> <payload>" read on stdin is written as one event,
 * "id: <count>\ndata: <payload>\n\n", with one write() per subscriber of that stream. A
 * subscriber whose socket cannot take the whole event is dropped: the floor buffers nothing.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

typedef struct { int fd, stream, attached, slot, head_len; char head[4096]; } Client;
typedef struct { int *fds; int n, cap; long long count; } Stream;

static Client **clients; /* by fd */
static Stream *streams;
static int nstreams;
static long long dropped;

static void detach(Client *c) {
    if (c->attached) {
        Stream *s = &streams[c->stream];
        int last = s->fds[--s->n];
        s->fds[c->slot] = last;
        clients[last]->slot = c->slot;
    }
    clients[c->fd] = NULL;
    close(c->fd);
    free(c);
}

static void attach(Client *c) {
    char *sp = strchr(c->head, ' '), *end = sp ? strchr(sp + 1, ' ') : NULL;
    int idx = 0;
    if (sp && end) {
        char *p = end;
        while (p > sp && p[-1] >= '0' && p[-1] <= '9') p--;
        idx = atoi(p);
    }
    if (idx < 0 || idx >= nstreams) idx = 0;
    static const char ok[] = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             "Cache-Control: no-cache\r\nConnection: close\r\n\r\n";
    if (write(c->fd, ok, sizeof ok - 1) != sizeof ok - 1) { detach(c); return; }
    Stream *s = &streams[idx];
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 64;
        s->fds = realloc(s->fds, s->cap * sizeof(int));
    }
    c->stream = idx; c->slot = s->n; c->attached = 1;
    s->fds[s->n++] = c->fd;
}

static void publish(char *line) {
    char *sp = strchr(line, ' ');
    if (!sp) return;
    int idx = atoi(line);
    if (idx < 0 || idx >= nstreams) return;
    Stream *s = &streams[idx];
    char ev[8192];
    int n = snprintf(ev, sizeof ev, "id: %lld\ndata: %s\n\n", ++s->count, sp + 1);
    if (n >= (int)sizeof ev) return;
    for (int i = 0; i < s->n;) {
        int fd = s->fds[i];
        if (write(fd, ev, n) != n) { dropped++; detach(clients[fd]); continue; }
        i++;
    }
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: floor PORT STREAMS\n"); return 2; }
    int port = atoi(argv[1]);
    nstreams = atoi(argv[2]);
    /* A write to a client that has just reset its connection must drop that client, not end
     * the server (in a reconnect storm, many have). */
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl; getrlimit(RLIMIT_NOFILE, &rl); rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    clients = calloc(rl.rlim_cur, sizeof *clients);
    streams = calloc(nstreams, sizeof *streams);
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) { perror("listen"); return 1; }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    ev.data.fd = 0;
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    static char in[1 << 20];
    int in_len = 0;
    struct epoll_event evs[512];
    for (;;) {
        int n = epoll_wait(ep, evs, 512, -1);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int c;
                while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if ((rlim_t)c >= rl.rlim_cur) { close(c); continue; }
                    Client *cl = calloc(1, sizeof *cl);
                    cl->fd = c; clients[c] = cl;
                    struct epoll_event ce = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ce);
                }
            } else if (fd == 0) {
                ssize_t r = read(0, in + in_len, sizeof in - in_len - 1);
                if (r <= 0) { fprintf(stderr, "floor: stdin closed; dropped %lld\n", dropped); return 0; }
                in_len += r;
                int start = 0;
                for (int j = 0; j < in_len; j++) {
                    if (in[j] == '\n') { in[j] = 0; publish(in + start); start = j + 1; }
                }
                memmove(in, in + start, in_len - start);
                in_len -= start;
            } else {
                Client *c = clients[fd];
                if (!c) continue;
                char buf[4096];
                ssize_t r = read(fd, buf, sizeof buf);
                if (r <= 0) { detach(c); continue; }
                if (c->attached) continue;
                int take = r < (ssize_t)(sizeof c->head - 1 - c->head_len) ? r : (int)(sizeof c->head - 1 - c->head_len);
                memcpy(c->head + c->head_len, buf, take);
                c->head_len += take; c->head[c->head_len] = 0;
                if (strstr(c->head, "\r\n\r\n")) attach(c);
            }
        }
    }
}
