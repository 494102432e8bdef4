/* getppid_loop: N calls of syscall(SYS_getppid).
 * The issue names getppid as its example of a delegated call, but lwk
 * answers it in the LWK (the parent of `lwk run` is the application's
 * parent as the user sees it), so under lwk this is a trap and a local
 * answer; delegated_loop measures the delegated round trip. */
#define _GNU_SOURCE
#include <unistd.h>
#include <sys/syscall.h>
#include "syscall_loop.h"

int main(int argc, char **argv) {
    long n = iterations(argc, argv), r;
    double ns;
    TIME_CALLS(n, syscall(SYS_getppid), &ns, &r);
    report(ns, n, r);
    return 0;
}
