/* getpid_loop: N calls of syscall(SYS_getpid).
 * Under lwk getpid is handled locally: trap (SIGSYS via Syscall User
 * Dispatch) into the in-process LWK and back, no proxy. Natively a plain
 * kernel entry (syscall(2) directly: no glibc caching). */
#define _GNU_SOURCE
#include <unistd.h>
#include <sys/syscall.h>
#include "syscall_loop.h"

int main(int argc, char **argv) {
    long n = iterations(argc, argv), r;
    double ns;
    TIME_CALLS(n, syscall(SYS_getpid), &ns, &r);
    report(ns, n, r);
    return 0;
}
