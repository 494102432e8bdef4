/* shared_anon: MAP_SHARED|MAP_ANONYMOUS memory stays shared with a forked
 * child; MAP_PRIVATE memory does not. */
#include <stdio.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
int main(){
  int *shared = mmap(0, 4096, PROT_READ|PROT_WRITE, MAP_SHARED|MAP_ANONYMOUS, -1, 0);
  int *priv = mmap(0, 4096, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
  *shared = 1; *priv = 1;
  pid_t p = fork();
  if (p == 0) { *shared = 42; *priv = 42; _exit(0); }
  waitpid(p, 0, 0);
  printf("shared=%d private=%d\n", *shared, *priv);
  return 0;
}
