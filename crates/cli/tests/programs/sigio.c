/* SIGIO (O_ASYNC on a pipe) and SIGURG (out-of-band data on a loopback TCP
 * socket), raised by the kernel for descriptors that live in the proxy,
 * reach the application because F_SETOWN names its pid. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <netinet/in.h>
#include <arpa/inet.h>
static volatile sig_atomic_t io, urg;
static void on_io(int s) { (void)s; io++; }
static void on_urg(int s) { (void)s; urg++; }
int main(void) {
    signal(SIGIO, on_io); signal(SIGURG, on_urg);
    int p[2]; pipe(p);
    fcntl(p[0], F_SETOWN, getpid());
    fcntl(p[0], F_SETFL, fcntl(p[0], F_GETFL) | O_ASYNC);
    write(p[1], "x", 1);
    for (int i = 0; i < 100 && !io; i++) usleep(1000);
    printf("SIGIO from a pipe: %d\n", io > 0);
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    bind(l, (void *)&a, sizeof a); listen(l, 1);
    socklen_t n = sizeof a; getsockname(l, (void *)&a, &n);
    int c = socket(AF_INET, SOCK_STREAM, 0); connect(c, (void *)&a, sizeof a);
    int s = accept(l, 0, 0);
    fcntl(s, F_SETOWN, getpid());
    send(c, "u", 1, MSG_OOB);
    for (int i = 0; i < 100 && !urg; i++) usleep(1000);
    printf("SIGURG from OOB data: %d\n", urg > 0);
    return 0;
}
