package provisioner

import (
	"bufio"
	"bytes"
	"sort"
	"strings"
)

// MergeRuxitAgentProcConf returns base (the code module's
// agent/conf/ruxitagentproc.conf: "[section]" headers and "key value" lines)
// with the tenant's properties applied: an existing key in its section is
// replaced in place, a new key is appended to its section, and a missing
// section is appended at the end. Comments and order are kept, so the result
// is deterministic for a given base and property set.
func MergeRuxitAgentProcConf(base []byte, props []Property) []byte {
	type sectionProps struct {
		order []string
		vals  map[string]string
		used  map[string]bool
	}
	want := map[string]*sectionProps{}
	var sectionOrder []string
	for _, p := range props {
		sec := strings.TrimSpace(p.Section)
		s := want[sec]
		if s == nil {
			s = &sectionProps{vals: map[string]string{}, used: map[string]bool{}}
			want[sec] = s
			sectionOrder = append(sectionOrder, sec)
		}
		key := strings.TrimSpace(p.Key)
		if _, ok := s.vals[key]; !ok {
			s.order = append(s.order, key)
		}
		s.vals[key] = p.Value
	}
	var out bytes.Buffer
	seenSections := map[string]bool{}
	current := ""
	flush := func(sec string) {
		s := want[sec]
		if s == nil {
			return
		}
		for _, k := range s.order {
			if !s.used[k] {
				out.WriteString(k + " " + s.vals[k] + "\n")
				s.used[k] = true
			}
		}
	}
	sc := bufio.NewScanner(bytes.NewReader(base))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		trim := strings.TrimSpace(line)
		if strings.HasPrefix(trim, "[") && strings.HasSuffix(trim, "]") {
			flush(current)
			current = strings.TrimSpace(trim[1 : len(trim)-1])
			seenSections[current] = true
			out.WriteString(line + "\n")
			continue
		}
		if trim != "" && !strings.HasPrefix(trim, "#") {
			key := strings.Fields(trim)[0]
			if s := want[current]; s != nil {
				if v, ok := s.vals[key]; ok {
					if !s.used[key] {
						out.WriteString(key + " " + v + "\n")
						s.used[key] = true
					}
					continue
				}
			}
		}
		out.WriteString(line + "\n")
	}
	flush(current)
	rest := make([]string, 0, len(sectionOrder))
	for _, sec := range sectionOrder {
		if !seenSections[sec] {
			rest = append(rest, sec)
		}
	}
	sort.Strings(rest)
	for _, sec := range rest {
		if sec == "" {
			flush(sec)
			continue
		}
		out.WriteString("\n[" + sec + "]\n")
		flush(sec)
	}
	return out.Bytes()
}
