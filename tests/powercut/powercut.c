/*
 * powercut: an LD_PRELOAD shim that keeps, for every file a process writes under
 * $POWERCUT_ROOT, a "durable" shadow copy holding only what an fsync/fdatasync covered.
 * After the process is killed, `restore` (tests/src/power.rs) puts the shadows in place
 * of the files: what a power cut leaves of them. A kill -9 alone keeps everything the
 * process wrote (the page cache survives it); this does not.
 *
 * - A file's shadow starts as a copy of the file when the process first opens it.
 * - Writes go to the real file (reads see them); the written byte range is recorded.
 * - fsync/fdatasync on any descriptor of the file copies the recorded range (one
 *   interval covering every write since the last sync: the bytes in between are equal
 *   in both, since any write to them would be in the interval) and the file's size into
 *   the shadow. sync_file_range is NOT a durability point: it neither flushes the drive
 *   cache nor the file's size.
 * - rename moves the shadow with the file; unlink removes it. Directory entries are taken
 *   as durable at once (not modelled).
 *
 * Shadows live in $POWERCUT_SHADOW, named by the file's path under the root with '/'
 * replaced by '%'. Only glibc's entry points that Rust's std and sled use are wrapped.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FDS 65536
#define MAX_FILES 1024

struct tracked {
    char path[PATH_MAX];
    char shadow[PATH_MAX];
    off_t lo, hi; /* written since the last sync: [lo, hi), empty when lo >= hi */
    int used;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct tracked files[MAX_FILES];
static int fd_file[MAX_FDS]; /* index + 1 into files, 0 when untracked */
static char root[PATH_MAX];
static char shadow_dir[PATH_MAX];
static int enabled = -1;

static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);
static int (*real_close)(int);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off64_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_pwritev)(int, const struct iovec *, int, off_t);
static ssize_t (*real_pwritev64)(int, const struct iovec *, int, off64_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_rename)(const char *, const char *);
static int (*real_renameat)(int, const char *, int, const char *);
static int (*real_unlink)(const char *);
static int (*real_unlinkat)(int, const char *, int);

static void init(void) {
    if (enabled != -1) return;
    real_open = dlsym(RTLD_NEXT, "open");
    real_open64 = dlsym(RTLD_NEXT, "open64");
    real_openat = dlsym(RTLD_NEXT, "openat");
    real_openat64 = dlsym(RTLD_NEXT, "openat64");
    real_close = dlsym(RTLD_NEXT, "close");
    real_write = dlsym(RTLD_NEXT, "write");
    real_pwrite = dlsym(RTLD_NEXT, "pwrite");
    real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    real_writev = dlsym(RTLD_NEXT, "writev");
    real_pwritev = dlsym(RTLD_NEXT, "pwritev");
    real_pwritev64 = dlsym(RTLD_NEXT, "pwritev64");
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_rename = dlsym(RTLD_NEXT, "rename");
    real_renameat = dlsym(RTLD_NEXT, "renameat");
    real_unlink = dlsym(RTLD_NEXT, "unlink");
    real_unlinkat = dlsym(RTLD_NEXT, "unlinkat");
    const char *r = getenv("POWERCUT_ROOT");
    const char *s = getenv("POWERCUT_SHADOW");
    if (r && s && realpath(r, root) && strlen(s) < sizeof shadow_dir) {
        strcpy(shadow_dir, s);
        enabled = 1;
    } else {
        enabled = 0;
    }
}

/* The absolute path of `path` (relative to `dirfd`) when it lies under the root. */
static int under_root(int dirfd, const char *path, char *out) {
    char joined[PATH_MAX * 2];
    if (path[0] == '/') {
        snprintf(joined, sizeof joined, "%s", path);
    } else if (dirfd == AT_FDCWD) {
        char cwd[PATH_MAX];
        if (!getcwd(cwd, sizeof cwd)) return 0;
        snprintf(joined, sizeof joined, "%s/%s", cwd, path);
    } else {
        char link[64], dir[PATH_MAX];
        snprintf(link, sizeof link, "/proc/self/fd/%d", dirfd);
        ssize_t n = readlink(link, dir, sizeof dir - 1);
        if (n < 0) return 0;
        dir[n] = 0;
        snprintf(joined, sizeof joined, "%s/%s", dir, path);
    }
    size_t len = strlen(root);
    if (strncmp(joined, root, len) != 0 || joined[len] != '/') return 0;
    if (strlen(joined) >= PATH_MAX) return 0;
    strcpy(out, joined);
    return 1;
}

static void shadow_of(const char *path, char *out) {
    char rel[PATH_MAX];
    snprintf(rel, sizeof rel, "%s", path + strlen(root) + 1);
    for (char *c = rel; *c; c++)
        if (*c == '/') *c = '%';
    snprintf(out, PATH_MAX, "%s/%s", shadow_dir, rel);
}

static void copy_range(int from, int to, off_t lo, off_t hi) {
    char buf[1 << 16];
    while (lo < hi) {
        size_t want = (size_t)(hi - lo) < sizeof buf ? (size_t)(hi - lo) : sizeof buf;
        ssize_t n = pread(from, buf, want, lo);
        if (n <= 0) break;
        if (real_pwrite64(to, buf, (size_t)n, lo) != n) break;
        lo += n;
    }
}

/* The tracked file for `path`, created (with its shadow as a copy of the file). */
static int track(const char *path) {
    for (int i = 0; i < MAX_FILES; i++)
        if (files[i].used && strcmp(files[i].path, path) == 0) return i;
    for (int i = 0; i < MAX_FILES; i++) {
        if (files[i].used) continue;
        struct tracked *t = &files[i];
        t->used = 1;
        strcpy(t->path, path);
        shadow_of(path, t->shadow);
        t->lo = 0;
        t->hi = 0;
        int exists = access(t->shadow, F_OK) == 0;
        if (!exists) {
            int src = real_open(path, O_RDONLY);
            int dst = real_open(t->shadow, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (src >= 0 && dst >= 0) {
                struct stat st;
                if (fstat(src, &st) == 0) copy_range(src, dst, 0, st.st_size);
            }
            if (src >= 0) real_close(src);
            if (dst >= 0) real_close(dst);
        }
        return i;
    }
    return -1;
}

static void opened(int fd, int dirfd, const char *path) {
    if (fd < 0 || fd >= MAX_FDS) return;
    init();
    if (!enabled) return;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return;
    char abs[PATH_MAX];
    if (!under_root(dirfd, path, abs)) return;
    pthread_mutex_lock(&lock);
    int i = track(abs);
    fd_file[fd] = i + 1;
    pthread_mutex_unlock(&lock);
}

static void wrote(int fd, off_t at, ssize_t n) {
    if (n <= 0 || fd < 0 || fd >= MAX_FDS || !fd_file[fd]) return;
    pthread_mutex_lock(&lock);
    struct tracked *t = &files[fd_file[fd] - 1];
    if (t->lo >= t->hi) {
        t->lo = at;
        t->hi = at + n;
    } else {
        if (at < t->lo) t->lo = at;
        if (at + n > t->hi) t->hi = at + n;
    }
    pthread_mutex_unlock(&lock);
}

static void synced(int fd) {
    if (fd < 0 || fd >= MAX_FDS || !fd_file[fd]) return;
    pthread_mutex_lock(&lock);
    struct tracked *t = &files[fd_file[fd] - 1];
    /* Read through a descriptor of our own: the caller's may be write-only. */
    int src = real_open(t->path, O_RDONLY);
    int dst = real_open(t->shadow, O_WRONLY | O_CREAT, 0644);
    if (src >= 0 && dst >= 0) {
        struct stat st;
        if (fstat(fd, &st) == 0) {
            if (t->lo < t->hi) copy_range(src, dst, t->lo, t->hi < st.st_size ? t->hi : st.st_size);
            if (ftruncate(dst, st.st_size) != 0) { /* the next sync tries again */ }
        }
        t->lo = t->hi = 0;
    }
    if (src >= 0) real_close(src);
    if (dst >= 0) real_close(dst);
    pthread_mutex_unlock(&lock);
}

static int mode_of(int flags, va_list ap) {
    return (flags & (O_CREAT | O_TMPFILE)) ? va_arg(ap, int) : 0;
}

int open(const char *path, int flags, ...) {
    init();
    va_list ap;
    va_start(ap, flags);
    int mode = mode_of(flags, ap);
    va_end(ap);
    int fd = real_open(path, flags, mode);
    opened(fd, AT_FDCWD, path);
    return fd;
}

int open64(const char *path, int flags, ...) {
    init();
    va_list ap;
    va_start(ap, flags);
    int mode = mode_of(flags, ap);
    va_end(ap);
    int fd = real_open64(path, flags, mode);
    opened(fd, AT_FDCWD, path);
    return fd;
}

int openat(int dirfd, const char *path, int flags, ...) {
    init();
    va_list ap;
    va_start(ap, flags);
    int mode = mode_of(flags, ap);
    va_end(ap);
    int fd = real_openat(dirfd, path, flags, mode);
    opened(fd, dirfd, path);
    return fd;
}

int openat64(int dirfd, const char *path, int flags, ...) {
    init();
    va_list ap;
    va_start(ap, flags);
    int mode = mode_of(flags, ap);
    va_end(ap);
    int fd = real_openat64(dirfd, path, flags, mode);
    opened(fd, dirfd, path);
    return fd;
}

int close(int fd) {
    init();
    if (fd >= 0 && fd < MAX_FDS) fd_file[fd] = 0;
    return real_close(fd);
}

ssize_t write(int fd, const void *buf, size_t count) {
    init();
    ssize_t n = real_write(fd, buf, count);
    if (n > 0 && fd >= 0 && fd < MAX_FDS && fd_file[fd]) wrote(fd, lseek(fd, 0, SEEK_CUR) - n, n);
    return n;
}

ssize_t writev(int fd, const struct iovec *iov, int cnt) {
    init();
    ssize_t n = real_writev(fd, iov, cnt);
    if (n > 0 && fd >= 0 && fd < MAX_FDS && fd_file[fd]) wrote(fd, lseek(fd, 0, SEEK_CUR) - n, n);
    return n;
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    init();
    ssize_t n = real_pwrite(fd, buf, count, offset);
    wrote(fd, offset, n);
    return n;
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t offset) {
    init();
    ssize_t n = real_pwrite64(fd, buf, count, offset);
    wrote(fd, offset, n);
    return n;
}

ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t offset) {
    init();
    ssize_t n = real_pwritev(fd, iov, cnt, offset);
    wrote(fd, offset, n);
    return n;
}

ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off64_t offset) {
    init();
    ssize_t n = real_pwritev64(fd, iov, cnt, offset);
    wrote(fd, offset, n);
    return n;
}

int fsync(int fd) {
    init();
    int r = real_fsync(fd);
    if (r == 0) synced(fd);
    return r;
}

int fdatasync(int fd) {
    init();
    int r = real_fdatasync(fd);
    if (r == 0) synced(fd);
    return r;
}

static void moved(int olddirfd, const char *old, int newdirfd, const char *new) {
    if (!enabled) return;
    char a[PATH_MAX], b[PATH_MAX];
    if (!under_root(olddirfd, old, a) || !under_root(newdirfd, new, b)) return;
    pthread_mutex_lock(&lock);
    char sa[PATH_MAX], sb[PATH_MAX];
    shadow_of(a, sa);
    shadow_of(b, sb);
    real_rename(sa, sb);
    for (int i = 0; i < MAX_FILES; i++) {
        if (files[i].used && strcmp(files[i].path, b) == 0) files[i].used = 0;
    }
    for (int i = 0; i < MAX_FILES; i++) {
        if (files[i].used && strcmp(files[i].path, a) == 0) {
            strcpy(files[i].path, b);
            strcpy(files[i].shadow, sb);
        }
    }
    pthread_mutex_unlock(&lock);
}

int rename(const char *old, const char *new) {
    init();
    int r = real_rename(old, new);
    if (r == 0) moved(AT_FDCWD, old, AT_FDCWD, new);
    return r;
}

int renameat(int olddirfd, const char *old, int newdirfd, const char *new) {
    init();
    int r = real_renameat(olddirfd, old, newdirfd, new);
    if (r == 0) moved(olddirfd, old, newdirfd, new);
    return r;
}

static void removed(int dirfd, const char *path) {
    if (!enabled) return;
    char a[PATH_MAX], sa[PATH_MAX];
    if (!under_root(dirfd, path, a)) return;
    pthread_mutex_lock(&lock);
    shadow_of(a, sa);
    real_unlink(sa);
    for (int i = 0; i < MAX_FILES; i++)
        if (files[i].used && strcmp(files[i].path, a) == 0) files[i].used = 0;
    pthread_mutex_unlock(&lock);
}

int unlink(const char *path) {
    init();
    int r = real_unlink(path);
    if (r == 0) removed(AT_FDCWD, path);
    return r;
}

int unlinkat(int dirfd, const char *path, int flags) {
    init();
    int r = real_unlinkat(dirfd, path, flags);
    if (r == 0 && !(flags & AT_REMOVEDIR)) removed(dirfd, path);
    return r;
}
