/* exec MODE: execve under the LWK.
 *   fds FILE:     open FILE twice, once close-on-exec, then exec itself in
 *                 `check` mode: the close-on-exec descriptor must be gone,
 *                 the other still open at the same offset.
 *   mask:         block SIGUSR1, then exec itself in `showmask` mode.
 *   errors DIR:   execve of things the kernel refuses (missing file, not
 *                 executable, not ELF, a directory): each returns its error
 *                 and the program goes on.
 *   relative DIR: chdir to DIR, then exec ./prog found there (a relative
 *                 path resolved against the application's cwd).
 *   argv0:        exec /bin/sh with argv[0] "renamed" to print $0. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern char **environ;

static void report(const char *what, int r) {
    printf("%-28s -> %d %s\n", what, r, r < 0 ? strerrorname_np(errno) : "");
    fflush(stdout);
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    (void)n;
    if (!strcmp(mode, "fds")) {
        int keep = open(argv[2], O_RDONLY);
        int gone = open(argv[2], O_RDONLY | O_CLOEXEC);
        char c;
        if (keep < 0 || gone < 0 || read(keep, &c, 1) != 1) { perror("open"); return 1; }
        char k[16], g[16];
        snprintf(k, sizeof k, "%d", keep);
        snprintf(g, sizeof g, "%d", gone);
        char *args[] = {argv[0], "check", k, g, NULL};
        execve(argv[0], args, environ);
        perror("execve");
        return 1;
    }
    if (!strcmp(mode, "check")) {
        int keep = atoi(argv[2]), gone = atoi(argv[3]);
        char c = 0;
        int r = fcntl(gone, F_GETFD);
        printf("close-on-exec fd %s\n", r < 0 && errno == EBADF ? "closed" : "STILL OPEN");
        printf("kept fd reads '%c' at offset 1\n", read(keep, &c, 1) == 1 ? c : '?');
        return 0;
    }
    if (!strcmp(mode, "mask")) {
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, SIGUSR1);
        sigprocmask(SIG_BLOCK, &s, NULL);
        char *args[] = {argv[0], "showmask", NULL};
        execve(argv[0], args, environ);
        perror("execve");
        return 1;
    }
    if (!strcmp(mode, "showmask")) {
        sigset_t s;
        sigprocmask(SIG_SETMASK, NULL, &s);
        printf("SIGUSR1 %s, SIGUSR2 %s after exec\n", sigismember(&s, SIGUSR1) ? "blocked" : "not blocked",
               sigismember(&s, SIGUSR2) ? "blocked" : "not blocked");
        return 0;
    }
    if (!strcmp(mode, "errors")) {
        char path[4200];
        char *args[] = {"x", NULL};
        const char *names[] = {"missing", "not-executable", "not-elf", "directory"};
        for (int i = 0; i < 4; i++) {
            snprintf(path, sizeof path, "%s/%s", argv[2], names[i]);
            errno = 0;
            report(names[i], execve(path, args, environ));
        }
        errno = 0;
        report("NULL path", execve(NULL, args, environ));
        errno = 0;
        report("bad argv", execve("/bin/true", (char **)8, environ));
        printf("still running\n");
        return 0;
    }
    if (!strcmp(mode, "relative")) {
        if (chdir(argv[2])) { perror("chdir"); return 1; }
        char *args[] = {"./prog", "check-relative", NULL};
        execve("./prog", args, environ);
        perror("execve ./prog");
        return 1;
    }
    if (!strcmp(mode, "check-relative")) {
        char cwd[4096];
        printf("running as %s in a directory ending with %s\n", argv[0], strrchr(getcwd(cwd, sizeof cwd), '/'));
        return 0;
    }
    if (!strcmp(mode, "argv0")) {
        char *args[] = {"renamed", "-c", "echo $0 $1", "one", NULL};
        execve("/bin/sh", args, environ);
        perror("execve");
        return 1;
    }
    fprintf(stderr, "usage: exec fds FILE | mask | errors DIR | relative DIR | argv0\n");
    return 2;
}
