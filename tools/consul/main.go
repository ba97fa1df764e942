// SPDX-License-Identifier: MPL-2.0
//
// Command consul is HashiCorp Consul v1.14.11's own command line, rebuilt
// from the Go module proxy so the tests can talk to a real agent (see
// internal/consultest). Consul's go.mod has replace directives, which make
// `go install github.com/hashicorp/consul@v1.14.11` refuse it, so this tiny
// module imports consul as a library and repeats its main.go (Copyright (c)
// HashiCorp, Inc., Mozilla Public License 2.0, as is this file) verbatim in
// behaviour: the same commands, help, version and exit codes.
//
// Build it with `make consul` from the repository root, never by hand: the
// Makefile caches the binary outside the clone and sets the version ldflags.
package main

import (
	"fmt"
	"io"
	"log"
	"os"

	mcli "github.com/mitchellh/cli"

	"github.com/hashicorp/consul/command"
	"github.com/hashicorp/consul/command/cli"
	"github.com/hashicorp/consul/command/version"
	_ "github.com/hashicorp/consul/service_os"
)

func main() {
	os.Exit(realMain())
}

func realMain() int {
	log.SetOutput(io.Discard)

	ui := &cli.BasicUI{
		BasicUi: mcli.BasicUi{Writer: os.Stdout, ErrorWriter: os.Stderr},
	}
	cmds := command.RegisteredCommands(ui)
	var names []string
	for c := range cmds {
		names = append(names, c)
	}

	c := &mcli.CLI{
		Args:         os.Args[1:],
		Commands:     cmds,
		Autocomplete: true,
		Name:         "consul",
		HelpFunc:     mcli.FilteredHelpFunc(names, mcli.BasicHelpFunc("consul")),
		HelpWriter:   os.Stdout,
		ErrorWriter:  os.Stderr,
	}

	if c.IsVersion() {
		return version.New(ui).Run(nil)
	}

	exitCode, err := c.Run()
	if err != nil {
		fmt.Fprintf(os.Stderr, "Error executing CLI: %v\n", err)
		return 1
	}
	return exitCode
}
