/* bad_pointers delegated FILE: passes bad pointers to read, write, stat,
 *   open and friends (calls the LWK delegates to the proxy).
 * bad_pointers local: passes them to calls the LWK handles in the
 *   application process (time, limits, signals, memory queries).
 * Prints the result and errno of each call: the kernel's EFAULT checks must
 * be reproduced exactly, wherever the LWK handles or delegates the call.
 * Calls go through syscall(2) where libc would check or use the vDSO.
 * With BAD_POINTERS_OUTSIDE_LWK set, the addresses where lwk keeps its own
 * memory (0x6c0000000000-0x6fffffffffff) are left out: only memory
 * protection keys make those fault under lwk. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/uio.h>
#include <sys/utsname.h>
#include <signal.h>
#include <time.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

static void report(const char *call, const char *what, long r) {
    int e = errno;
    if (r < 0)
        printf("%-17s %-26s -> -1 %s\n", call, what, strerrorname_np(e));
    else
        printf("%-17s %-26s -> %ld\n", call, what, r);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: bad_pointers delegated FILE | local\n"); return 2; }
    int local = !strcmp(argv[1], "local");
    const char *file = argc > 2 ? argv[2] : "/etc/passwd";
    long page = sysconf(_SC_PAGESIZE);
    /* Three pages, the middle one unmapped again: a hole that was mapped
     * (and touched) before, and buffers that run from a mapped page into it. */
    char *m = mmap(NULL, 3 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { perror("mmap"); return 1; }
    memset(m, 'x', 3 * page);
    if (munmap(m + page, page)) { perror("munmap"); return 1; }
    char *hole = m + page;

    struct { const char *name; void *p; } bad[] = {
        {"NULL", NULL},
        {"(void*)1", (void *)1},
        {"0xdeadbeef", (void *)0xdeadbeefUL},
        {"munmapped page", hole},
        {"8 before munmapped page", hole - 8},
        {"last byte of munmapped", hole + page - 1},
        {"0x6d0000000000", (void *)0x6d0000000000UL},
        {"0x6e0000000000", (void *)0x6e0000000000UL},
        {"0x6e0000001000", (void *)0x6e0000001000UL},
        {"0x6f0000000000", (void *)0x6f0000000000UL},
        {"0x6f0000001000", (void *)0x6f0000001000UL},
        {"0x7ff000000000", (void *)0x7ff000000000UL},
        {"0x7ffffffff000", (void *)0x7ffffffff000UL},
        {"kernel 0xffff800000000000", (void *)0xffff800000000000UL},
        {"non-canonical 1<<63", (void *)(1UL << 63)},
    };

    int zero = open("/dev/zero", O_RDONLY);
    int reg = open(file, O_RDONLY);
    int pfd[2];
    if (zero < 0 || reg < 0 || pipe(pfd)) { perror("setup"); return 1; }

    size_t nbad = sizeof bad / sizeof bad[0];
    if (getenv("BAD_POINTERS_OUTSIDE_LWK")) {
        size_t k = 0;
        for (size_t i = 0; i < nbad; i++) {
            uintptr_t a = (uintptr_t)bad[i].p;
            if (a < 0x6c0000000000UL || a >= 0x700000000000UL)
                bad[k++] = bad[i];
        }
        nbad = k;
    }
    if (local) {
        for (size_t i = 0; i < nbad; i++) {
            void *p = bad[i].p;
            const char *n = bad[i].name;
            long r;
            errno = 0; r = syscall(SYS_clock_gettime, CLOCK_MONOTONIC, p); report("clock_gettime", n, r);
            errno = 0; r = syscall(SYS_gettimeofday, p, NULL); report("gettimeofday", n, r);
            errno = 0; r = syscall(SYS_getrlimit, RLIMIT_STACK, p); report("getrlimit", n, r);
            errno = 0; r = syscall(SYS_prlimit64, 0, RLIMIT_NOFILE, NULL, p); report("prlimit64", n, r);
            errno = 0; r = syscall(SYS_getrusage, RUSAGE_SELF, p); report("getrusage", n, r);
            errno = 0; r = syscall(SYS_uname, p); report("uname", n, r);
            errno = 0; r = syscall(SYS_sched_getaffinity, 0, 128, p); report("sched_getaffinity", n, r);
            errno = 0; r = syscall(SYS_rt_sigprocmask, SIG_BLOCK, NULL, p, 8); report("sigprocmask old", n, r);
            errno = 0; r = syscall(SYS_rt_sigprocmask, SIG_BLOCK, p, NULL, 8); report("sigprocmask new", n, r);
            errno = 0; r = syscall(SYS_rt_sigaction, SIGUSR1, NULL, p, 8); report("sigaction old", n, r);
            errno = 0; r = syscall(SYS_rt_sigaction, SIGUSR1, p, NULL, 8); report("sigaction new", n, r);
            errno = 0; r = syscall(SYS_nanosleep, p, NULL); report("nanosleep", n, r);
            errno = 0; r = syscall(SYS_sigaltstack, NULL, p); report("sigaltstack old", n, r);
            errno = 0; r = syscall(SYS_getcpu, p, NULL, NULL); report("getcpu", n, r);
            errno = 0; r = syscall(SYS_time, p); report("time", n, r < 0 ? r : 0);
            errno = 0; r = syscall(SYS_mincore, m, page, p); report("mincore", n, r);
        }
        return 0;
    }
    for (size_t i = 0; i < nbad; i++) {
        void *p = bad[i].p;
        const char *n = bad[i].name;
        struct stat st;
        long r;
        errno = 0; r = read(zero, p, 16); report("read", n, r);
        errno = 0; r = pread(reg, p, 16, 0); report("pread", n, r);
        errno = 0; r = write(pfd[1], p, 16); report("write", n, r);
        errno = 0; r = stat(p, &st); report("stat", n, r);
        errno = 0; r = stat(file, p); report("stat2", n, r);
        errno = 0; r = fstat(reg, p); report("fstat", n, r);
        errno = 0; r = open(p, O_RDONLY); report("open", n, r);
        if (r >= 0) close(r);
        errno = 0; r = syscall(SYS_openat, AT_FDCWD, p, O_RDONLY); report("openat", n, r);
        if (r >= 0) close(r);
        struct iovec iov = {p, 16};
        errno = 0; r = readv(zero, &iov, 1); report("readv", n, r);
        errno = 0; r = writev(pfd[1], &iov, 1); report("writev", n, r);
        errno = 0; r = readv(zero, p, 1); report("readv iov", n, r);
        errno = 0; r = syscall(SYS_getcwd, p, 64); report("getcwd", n, r);
    }
    /* Drain whatever the writes above put in the pipe (nothing natively). */
    fcntl(pfd[0], F_SETFL, O_NONBLOCK);
    char sink[4096];
    errno = 0;
    long left = read(pfd[0], sink, sizeof sink);
    report("drain", "pipe", left);
    return 0;
}
