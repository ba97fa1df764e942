// Package yamlconf decodes shardgate's YAML configuration files the same
// way for every command: unknown fields are errors (a misspelt option fails
// at start instead of being ignored), every error names its field by dotted
// path, and durations and sizes are written the way operators write them.
package yamlconf

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Decode decodes the YAML document b into v strictly. An empty document
// leaves v as it is. Errors name the field they are about, e.g.
// "shutdown.grace: line 4: `soon` is not a duration".
func Decode(b []byte, v any) error {
	var root yaml.Node
	if err := yaml.Unmarshal(b, &root); err != nil {
		return err
	}
	if root.Kind == 0 {
		return nil
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil && !errors.Is(err, io.EOF) {
		return nameFields(&root, err)
	}
	return nil
}

// nameFields prefixes the decoder's "line N: …" messages with the dotted
// path of the field on that line, so a value of the wrong type is reported
// by field name like every other config error.
func nameFields(root *yaml.Node, err error) error {
	var te *yaml.TypeError
	msgs := []string{err.Error()}
	if errors.As(err, &te) {
		msgs = te.Errors
	}
	out := make([]string, 0, len(msgs))
	for _, m := range msgs {
		var line int
		if _, scanErr := fmt.Sscanf(m, "line %d:", &line); scanErr == nil {
			// The value quoted in backticks tells apart several keys on
			// one line ({a: 1, b: x}).
			val := ""
			if _, rest, ok := strings.Cut(m, "`"); ok {
				val, _, _ = strings.Cut(rest, "`")
			}
			if path := fieldAtLine(root, line, val, ""); path != "" {
				m = path + ": " + m
			}
		}
		out = append(out, m)
	}
	return errors.New(strings.Join(out, "; "))
}

// fieldAtLine returns the dotted path of the innermost key on line whose
// scalar value is val (any value when val is ""), or of the key itself when
// the key is unknown; "" if none.
func fieldAtLine(n *yaml.Node, line int, val, path string) string {
	switch n.Kind {
	case yaml.DocumentNode:
		for _, c := range n.Content {
			if p := fieldAtLine(c, line, val, path); p != "" {
				return p
			}
		}
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			p := k.Value
			if path != "" {
				p = path + "." + k.Value
			}
			if inner := fieldAtLine(v, line, val, p); inner != "" {
				return inner
			}
			if k.Line == line && (val == "" || v.Value == val || k.Value == val) {
				return p
			}
		}
	case yaml.SequenceNode:
		for i, c := range n.Content {
			p := fmt.Sprintf("%s[%d]", path, i)
			if inner := fieldAtLine(c, line, val, p); inner != "" {
				return inner
			}
			if c.Kind == yaml.ScalarNode && c.Line == line && (val == "" || c.Value == val) {
				return p
			}
		}
	}
	return ""
}

// Duration is a time.Duration written as "10s", "1m30s" in YAML.
type Duration time.Duration

// D returns the time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// UnmarshalYAML accepts Go duration strings.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	v, err := time.ParseDuration(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: `%s` is not a duration (e.g. 10s, 500ms)", n.Line, n.Value)
	}
	*d = Duration(v)
	return nil
}

// MarshalYAML writes the duration string.
func (d Duration) MarshalYAML() (any, error) { return time.Duration(d).String(), nil }

// ByteSize is a size written as 65536, "64KiB" or "1MiB" in YAML.
type ByteSize int

// UnmarshalYAML accepts a plain integer or a KiB/MiB suffix.
func (s *ByteSize) UnmarshalYAML(n *yaml.Node) error {
	v := strings.TrimSpace(n.Value)
	mult := 1
	for _, u := range []struct {
		suffix string
		mult   int
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"KB", 1000}, {"MB", 1000 * 1000}, {"B", 1}} {
		if strings.HasSuffix(v, u.suffix) {
			v, mult = strings.TrimSpace(strings.TrimSuffix(v, u.suffix)), u.mult
			break
		}
	}
	i, err := strconv.Atoi(v)
	if err != nil {
		return fmt.Errorf("line %d: `%s` is not a size (e.g. 65536, 64KiB)", n.Line, n.Value)
	}
	*s = ByteSize(i * mult)
	return nil
}
