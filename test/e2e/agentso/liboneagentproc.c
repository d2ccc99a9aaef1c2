/*
 * A stand-in for the OneAgent process module, for the e2e tests only: when a
 * process loads it (LD_PRELOAD), its constructor appends one line to a
 * marker file, so the test can see which processes loaded it from the CSI
 * volume. It never fails its host process.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

__attribute__((constructor)) static void oneagent_e2e_loaded(int argc, char **argv)
{
    const char *path = getenv("ONEAGENT_E2E_MARKER");
    if (path == NULL || *path == '\0')
        path = "/var/lib/dynatrace/oneagent/loaded";
    char line[512];
    int n = snprintf(line, sizeof line, "loaded pid=%d argv0=%s\n", (int)getpid(),
                     (argc > 0 && argv != NULL && argv[0] != NULL) ? argv[0] : "?");
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    if (n > 0)
        (void)!write(fd, line, (size_t)n);
    close(fd);
}
