package provisioner_test

import (
	"testing"

	"github.com/oneagent-csi/oneagent-csi/provisioner"
)

func TestMergeRuxitAgentProcConf(t *testing.T) {
	base := []byte("# comment\n[general]\nloglevel info\ntenant \n\n[agentType]\nprocess on\n")
	props := []provisioner.Property{
		{Section: "general", Key: "tenant", Value: "abc"},
		{Section: "general", Key: "serverAddress", Value: "{https://x}"},
		{Section: "agentType", Key: "process", Value: "off"},
		{Section: "zeta", Key: "k", Value: "v"},
	}
	got := string(provisioner.MergeRuxitAgentProcConf(base, props))
	want := "# comment\n[general]\nloglevel info\ntenant abc\n\nserverAddress {https://x}\n[agentType]\nprocess off\n\n[zeta]\nk v\n"
	if got != want {
		t.Fatalf("merged:\n%s\nwant:\n%s", got, want)
	}
	if again := string(provisioner.MergeRuxitAgentProcConf([]byte(got), props)); again != got {
		t.Errorf("merging twice changed the file:\n%s", again)
	}
}

// An archive declaring more entries than allowed is refused from its end
// record (and, above 65,535 entries, its ZIP64 form) before its central
// directory is decoded into memory: the refusal allocates next to nothing.
