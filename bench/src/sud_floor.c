/* sud_floor: the cost floor of any Syscall-User-Dispatch-based design, no lwk.
 * Switches Syscall User Dispatch on for this process, with an empty SIGSYS
 * handler that only writes a fake return value into RAX, then times N calls of
 * syscall(SYS_getpid). Each call is: syscall entry, SUD check, SIGSYS frame
 * built on the user stack (with the FPU/xsave state), handler, rt_sigreturn
 * (a second syscall, from our own restorer inside the allowed region), state
 * restored. lwk's local calls cost this plus the LWK's own handler.
 * Run natively only. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include "syscall_loop.h"

#ifndef PR_SET_SYSCALL_USER_DISPATCH
#define PR_SET_SYSCALL_USER_DISPATCH 59
#define PR_SYS_DISPATCH_OFF 0
#define PR_SYS_DISPATCH_ON 1
#define SYSCALL_DISPATCH_FILTER_ALLOW 0
#define SYSCALL_DISPATCH_FILTER_BLOCK 1
#endif
#define SA_RESTORER_FLAG 0x04000000

/* The restorer: rt_sigreturn from inside the allowed region, so it is not
 * dispatched itself. */
extern char sud_begin[], sud_end[];
__asm__(".text\n"
        ".globl sud_begin\n"
        "sud_begin:\n"
        "  mov $15, %eax\n"
        "  syscall\n"
        "  hlt\n"
        ".globl sud_end\n"
        "sud_end:\n");

static volatile char selector = SYSCALL_DISPATCH_FILTER_ALLOW;
#define FAKE 4242

static void on_sigsys(int sig, siginfo_t *si, void *ctx) {
    (void)sig;
    (void)si;
    ucontext_t *uc = ctx;
    uc->uc_mcontext.gregs[REG_RAX] = FAKE;
}

struct k_sigaction {
    void (*handler)(int, siginfo_t *, void *);
    unsigned long flags;
    void (*restorer)(void);
    uint64_t mask;
};

int main(int argc, char **argv) {
    long n = iterations(argc, argv), r;
    double ns;
    struct k_sigaction ka = {on_sigsys, SA_SIGINFO | SA_RESTORER_FLAG, (void (*)(void))sud_begin, 0};
    if (syscall(SYS_rt_sigaction, SIGSYS, &ka, NULL, 8) != 0) {
        perror("rt_sigaction");
        return 2;
    }
    if (prctl(PR_SET_SYSCALL_USER_DISPATCH, PR_SYS_DISPATCH_ON, (unsigned long)sud_begin,
              (unsigned long)(sud_end - sud_begin), &selector) != 0) {
        perror("prctl(PR_SET_SYSCALL_USER_DISPATCH)");
        return 2;
    }
    selector = SYSCALL_DISPATCH_FILTER_BLOCK;
    TIME_CALLS(n, syscall(SYS_getpid), &ns, &r);
    selector = SYSCALL_DISPATCH_FILTER_ALLOW;
    if (r != FAKE) {
        fprintf(stderr, "getpid returned %ld, not the handler's %d: dispatch not active\n", r, FAKE);
        return 3;
    }
    report(ns, n, r);
    return 0;
}
