/* fork: parent and child each have their own memory after fork (a global
 * and a heap buffer changed in the child stay as they were in the parent),
 * share the pipe the child writes to, and the parent gets the child's exit
 * status from waitpid. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>
int main(){
  int g = 5; char *heap = malloc(1000); strcpy(heap, "parent data");
  int p[2]; pipe(p);
  pid_t pid = fork();
  if (pid == 0) { g = 7; strcpy(heap, "child data"); char buf[64]; int n = snprintf(buf, sizeof buf, "child g=%d heap=%s\n", g, heap); write(p[1], buf, n); _exit(3); }
  if (pid < 0) { perror("fork"); return 1; }
  char buf[64] = {0}; read(p[0], buf, 63);
  int st; waitpid(pid, &st, 0);
  printf("%sparent g=%d heap=%s child exit=%d\n", buf, g, heap, WEXITSTATUS(st));
  return 0;
}
