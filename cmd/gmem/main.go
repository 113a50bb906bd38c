//go:build amd64

// Command gmem inspects a host for running guests and measures guest-memory
// setup on it.
//
//	gmem run [flags]          a demo guest on KVM: every step of guest memory, timed
//	gmem probe [--json]       what the host offers: KVM, hugepages, limits
//	gmem bench [flags]        time reserve, KVM registration, prefault and
//	                          teardown of guest RAM, against peers
//
// See docs/gmem.md for every flag and the method behind the figures.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/alecthomas/kong"
)

// CLI is the command line. Each command is a struct with a Run(*Env) error
// method; adding one is one field here.
type CLI struct {
	Run   RunCmd   `cmd:"" help:"Run a demo guest: map, prefault, register with KVM, write and verify every page, dirty pages, balloon, snapshot."`
	Probe ProbeCmd `cmd:"" help:"Report what this host offers guests: KVM, hugepages, memory limits, and advice."`
	Bench BenchCmd `cmd:"" help:"Benchmark guest-memory setup: reserve, KVM registration, prefault, teardown."`
	Boot  BootCmd  `cmd:"" help:"Boot a Linux kernel on KVM with package vmm and stream its serial console; Ctrl-C stops it."`
}

// Env is what every command runs with: where to write, the host's /proc
// and /sys, and a context that Ctrl-C cancels.
type Env struct {
	Ctx    context.Context
	Stdout io.Writer
	Stderr io.Writer
	Root   fs.FS // the host's root directory, for /proc and /sys
	// Args is the command line as given (without the program name), for
	// reports that record how they were made.
	Args []string
}

// exitCode is raised (as a panic) by kong's exit hook, so that --help in
// run returns instead of exiting the process.
type exitCode int

// Exit codes.
const (
	exitOK          = 0
	exitError       = 1
	exitUsage       = 2
	exitInterrupted = 130
)

// errInterrupted is returned by a command stopped by Ctrl-C after it
// reported what it had measured.
var errInterrupted = errors.New("interrupted")

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		// After the first Ctrl-C the command winds down and reports; a
		// second one kills the process the default way.
		<-ctx.Done()
		stop()
	}()
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr, os.DirFS("/"))
	stop()
	os.Exit(code)
}

// run parses args and runs the command, returning the exit status. Every
// failure is one line on stderr: never a stack trace.
func run(ctx context.Context, args []string, stdout, stderr io.Writer, root fs.FS) (code int) {
	defer func() {
		if r := recover(); r != nil {
			if c, ok := r.(exitCode); ok {
				code = int(c)
				return
			}
			fmt.Fprintf(stderr, "gmem: internal error: %v\n", r)
			code = exitError
		}
	}()
	var cli CLI
	parser, err := kong.New(&cli,
		kong.Name("gmem"),
		kong.Description("Inspect a host for guests and benchmark guest-memory setup. See docs/gmem.md."),
		kong.Writers(stdout, stderr),
		kong.Exit(func(c int) { panic(exitCode(c)) }),
		kong.ConfigureHelp(kong.HelpOptions{Compact: true}),
	)
	if err != nil {
		fmt.Fprintf(stderr, "gmem: internal error: %v\n", err)
		return exitError
	}
	// A wrong command line, including a flag value its command's Validate
	// refuses, exits 2.
	kctx, err := parser.Parse(args)
	if err != nil {
		fmt.Fprintf(stderr, "gmem: error: %s (see %s)\n", oneLine(err.Error()), helpFor(err))
		return exitUsage
	}
	env := &Env{Ctx: ctx, Stdout: stdout, Stderr: stderr, Root: root, Args: args}
	if err := kctx.Run(env); err != nil {
		if errors.Is(err, errInterrupted) {
			fmt.Fprintf(stderr, "gmem: %s\n", oneLine(err.Error()))
			return exitInterrupted
		}
		fmt.Fprintf(stderr, "gmem: error: %s\n", oneLine(err.Error()))
		return exitError
	}
	return exitOK
}

// helpFor names the help that covers a parse error: the command's when
// one was given.
func helpFor(err error) string {
	var pe *kong.ParseError
	if errors.As(err, &pe) && pe.Context != nil {
		if cmd := strings.Fields(pe.Context.Command()); len(cmd) > 0 {
			return "gmem " + cmd[0] + " --help"
		}
	}
	return "gmem --help"
}

// oneLine joins a multi-line message (errors.Join) into one line.
func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", "; ")), " ")
}
