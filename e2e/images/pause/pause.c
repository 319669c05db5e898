/* pause: PID 1 of a pod sandbox. Holds the pod's namespaces open, reaps every zombie that is
 * re-parented to it (processes of containers that share its PID namespace), and exits 0 on
 * SIGTERM or SIGINT so the runtime can tear the sandbox down without waiting for SIGKILL.
 * Written for the ray-operator test node; built statically with musl (e2e/images/pause/build). */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_stop(int sig) {
  /* Only async-signal-safe calls here. */
  static const char msg[] = "pause: stopping\n";
  (void)sig;
  (void)!write(STDERR_FILENO, msg, sizeof msg - 1);
  _exit(0);
}

static void on_child(int sig) {
  int saved = errno;
  (void)sig;
  /* One SIGCHLD may stand for several exits: reap until none is left. */
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
  errno = saved;
}

int main(int argc, char **argv) {
  struct sigaction stop = {0}, child = {0};
  if (argc > 1 && strcmp(argv[1], "-v") == 0) {
    puts("pause (ray-operator test node)");
    return 0;
  }
  if (getpid() != 1) fputs("pause: warning: not PID 1\n", stderr);
  stop.sa_handler = on_stop;
  sigemptyset(&stop.sa_mask);
  child.sa_handler = on_child;
  child.sa_flags = SA_NOCLDSTOP | SA_RESTART;
  sigemptyset(&child.sa_mask);
  if (sigaction(SIGINT, &stop, NULL) < 0 || sigaction(SIGTERM, &stop, NULL) < 0 ||
      sigaction(SIGCHLD, &child, NULL) < 0) {
    perror("pause: sigaction");
    return 1;
  }
  for (;;) pause();
}
