// Command oldkernel runs a command as if on a kernel older than 5.8 (tests
// only): a seccomp filter makes the new mount API (open_tree, move_mount,
// fsopen, fsconfig, fsmount, fspick, mount_setattr) and statx fail with
// ENOSYS, exactly what a 4.18 kernel answers. So the node driver's old-kernel
// paths run for real on this machine's kernel.
//
//	oldkernel -- oneagent-csi node --config ...
package main

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// x86_64 numbers of the hidden calls.
var hidden = []uint32{
	332, // statx (Linux 4.11; its mount-root attribute came in 5.8)
	428, // open_tree
	429, // move_mount
	430, // fsopen
	431, // fsconfig
	432, // fsmount
	433, // fspick
	442, // mount_setattr
}

const auditArchX8664 = 0xc000003e

func filter() []unix.SockFilter {
	const (
		ldW  = unix.BPF_LD | unix.BPF_W | unix.BPF_ABS
		jeqK = unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K
		retK = unix.BPF_RET | unix.BPF_K
	)
	n := uint8(len(hidden))
	prog := []unix.SockFilter{
		{Code: ldW, K: 4}, // seccomp_data.arch
		{Code: jeqK, Jt: 0, Jf: n + 1, K: auditArchX8664},
		{Code: ldW, K: 0}, // seccomp_data.nr
	}
	for i, nr := range hidden {
		// Jump to the ENOSYS return on a match; the allow return follows the list.
		prog = append(prog, unix.SockFilter{Code: jeqK, Jt: n - uint8(i), Jf: 0, K: nr})
	}
	return append(prog,
		unix.SockFilter{Code: retK, K: unix.SECCOMP_RET_ALLOW},
		unix.SockFilter{Code: retK, K: unix.SECCOMP_RET_ERRNO | uint32(unix.ENOSYS)},
	)
}

func main() {
	args := os.Args[1:]
	if len(args) > 0 && args[0] == "--" {
		args = args[1:]
	}
	if len(args) == 0 || runtime.GOARCH != "amd64" {
		fmt.Fprintln(os.Stderr, "usage (amd64 only): oldkernel -- command [args...]")
		os.Exit(2)
	}
	path, err := exec.LookPath(args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, "oldkernel:", err)
		os.Exit(2)
	}
	runtime.LockOSThread()
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		fmt.Fprintln(os.Stderr, "oldkernel: no_new_privs:", err)
		os.Exit(1)
	}
	f := filter()
	prog := unix.SockFprog{Len: uint16(len(f)), Filter: &f[0]}
	if _, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC,
		uintptr(unsafe.Pointer(&prog))); errno != 0 {
		fmt.Fprintln(os.Stderr, "oldkernel: seccomp:", errno)
		os.Exit(1)
	}
	err = syscall.Exec(path, args, os.Environ())
	fmt.Fprintln(os.Stderr, "oldkernel: exec:", err)
	os.Exit(1)
}
