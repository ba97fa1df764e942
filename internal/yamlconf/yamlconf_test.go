package yamlconf

import (
	"strings"
	"testing"
	"time"
)

type sample struct {
	Name  string   `yaml:"name"`
	Wait  Duration `yaml:"wait"`
	Size  ByteSize `yaml:"size"`
	Count int      `yaml:"count"`
	Inner struct {
		List []struct {
			ID    string `yaml:"id"`
			Level int    `yaml:"level"`
		} `yaml:"list"`
	} `yaml:"inner"`
}

func TestDecodeValues(t *testing.T) {
	var s sample
	err := Decode([]byte("name: x\nwait: 1m30s\nsize: 64KiB\ninner:\n  list:\n    - {id: a, level: 2}\n"), &s)
	if err != nil {
		t.Fatal(err)
	}
	if s.Wait.D() != 90*time.Second || s.Size != 64<<10 || len(s.Inner.List) != 1 || s.Inner.List[0].Level != 2 {
		t.Fatalf("decoded %+v", s)
	}
	var empty sample
	if err := Decode(nil, &empty); err != nil || empty.Name != "" {
		t.Fatalf("empty document: %v %+v", err, empty)
	}
}

// TestDecodeErrorsNameTheField: a wrong value, a wrong type or an unknown
// key is reported by its dotted path, also with several keys on one line.
func TestDecodeErrorsNameTheField(t *testing.T) {
	cases := []struct{ yaml, want string }{
		{"wait: soon\n", "wait: line 1: `soon` is not a duration"},
		{"size: 12XB\n", "size: line 1: `12XB` is not a size"},
		{"count: two\n", "count: line 1:"},
		{"inner:\n  list:\n    - {id: a, level: high}\n", "inner.list[0].level: line 3:"},
		{"nmae: x\n", "nmae: line 1: field nmae not found"},
		{"name: [\n", "did not find"},
	}
	for _, tc := range cases {
		var s sample
		err := Decode([]byte(tc.yaml), &s)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Decode(%q) = %v, want it to contain %q", tc.yaml, err, tc.want)
		}
	}
}
