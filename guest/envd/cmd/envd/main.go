// Command envd runs cubicle's envd on its own, outside the cubicle binary: for
// development, for the real-SDK smoke test (guest/envd/testdata/sdk-smoke.mjs) and
// for templates that want envd as a standalone /usr/bin/envd.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/cubicle-dev/cubicle/guest/envd"
)

func main() {
	opts := envd.Options{}
	flag.StringVar(&opts.Addr, "addr", envd.DefaultAddr, "TCP address to serve on")
	flag.StringVar(&opts.DefaultUser, "user", "", `default user until /init sets one (default "user" if it exists, else root)`)
	flag.StringVar(&opts.DefaultWorkdir, "workdir", "", "default working directory until /init sets one (default: the user's home)")
	flag.StringVar(&opts.RunDir, "rundir", envd.DefaultRunDir, `directory for the sandbox identity files written by /init ("-" for none)`)
	flag.BoolVar(&opts.NoInit, "no-init", false, "do not act as init even when running as PID 1")
	debug := flag.Bool("debug", false, "log at debug level")
	version := flag.Bool("version", false, "print the envd protocol version and exit")
	flag.Parse()
	if *version {
		fmt.Println(envd.Version)
		return
	}
	level := slog.LevelInfo
	if *debug {
		level = slog.LevelDebug
	}
	opts.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	err := envd.Run(ctx, opts)
	var exit *envd.ExitError
	switch {
	case errors.As(err, &exit):
		os.Exit(exit.Code)
	case err != nil:
		opts.Logger.Error("envd failed", "err", err)
		os.Exit(1)
	}
}
