/* delegated_loop: N calls of syscall(SYS_fcntl, fd, F_GETFD) on a /dev/null fd.
 * getppid is handled locally by the LWK (see `lwk syscalls`), so it does not
 * measure delegation; fcntl needs the fd table, which lives in the proxy, so
 * under lwk every call is a full delegated round trip (trap, request on the
 * shared ring, proxy worker executes it, reply). Natively it is one of the
 * cheapest fd system calls. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <unistd.h>
#include <sys/syscall.h>
#include "syscall_loop.h"

int main(int argc, char **argv) {
    long n = iterations(argc, argv), r;
    double ns;
    int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        perror("open /dev/null");
        return 2;
    }
    TIME_CALLS(n, syscall(SYS_fcntl, fd, F_GETFD), &ns, &r);
    close(fd);
    if (r != FD_CLOEXEC) {
        fprintf(stderr, "fcntl(F_GETFD) returned %ld, expected FD_CLOEXEC\n", r);
        return 3;
    }
    report(ns, n, r);
    return 0;
}
