package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestWriteReportSection(t *testing.T) {
	path := filepath.Join(t.TempDir(), "benchmarks.md")
	if err := os.WriteFile(path, []byte("# Benchmarks\n\nhand-written\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := writeReportSection(path, "compare", "# Report\n\n## One\n\n```\n# not a heading\n```\nfirst\n"); err != nil {
		t.Fatal(err)
	}
	if err := writeReportSection(path, "compare", "# Report\n\nsecond\n"); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	got := string(b)
	for _, want := range []string{"# Benchmarks\n\nhand-written\n", "## Report", "second", "<!-- bench:compare end -->"} {
		if !strings.Contains(got, want) {
			t.Errorf("missing %q in:\n%s", want, got)
		}
	}
	if strings.Contains(got, "first") || strings.Count(got, "bench:compare begin") != 1 {
		t.Errorf("the second write did not replace the first:\n%s", got)
	}
	// Headings in code blocks stay as they are.
	if err := writeReportSection(path, "other", "```\n# kept\n```\n"); err != nil {
		t.Fatal(err)
	}
	b, _ = os.ReadFile(path)
	if !strings.Contains(string(b), "\n# kept\n") {
		t.Errorf("a code block's line was demoted:\n%s", b)
	}
	if err := os.WriteFile(path, []byte("<!-- bench:compare end -->\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := writeReportSection(path, "compare", "x"); err == nil {
		t.Error("a file with one marker was overwritten")
	}
}
