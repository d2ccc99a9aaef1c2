package extract

import (
	"encoding/binary"
	"testing"
)

// zip64Offset finds the offset behind the saturated sizes that precede it.
func TestZip64Offset(t *testing.T) {
	field := func(id uint16, values ...uint64) []byte {
		b := binary.LittleEndian.AppendUint16(nil, id)
		b = binary.LittleEndian.AppendUint16(b, uint16(8*len(values)))
		for _, v := range values {
			b = binary.LittleEndian.AppendUint64(b, v)
		}
		return b
	}
	const big = 5 << 30
	for _, tc := range []struct {
		name                     string
		extra                    []byte
		uncompressed, compressed uint32
		want                     uint64
		ok                       bool
	}{
		{"offset only", field(1, big), 10, 10, big, true},
		{"after both sizes", field(1, 1, 2, big), 0xffffffff, 0xffffffff, big, true},
		{"after the uncompressed size", field(1, 1, big), 0xffffffff, 10, big, true},
		{"after another field", append(field(0x5455, 7), field(1, big)...), 10, 10, big, true},
		{"missing", field(0x5455, 7), 10, 10, 0, false},
		{"too short", field(1, 1), 0xffffffff, 10, 0, false},
		{"truncated field", field(1, big)[:6], 10, 10, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := zip64Offset(tc.extra, tc.uncompressed, tc.compressed)
			if got != tc.want || ok != tc.ok {
				t.Fatalf("zip64Offset = %d, %v; want %d, %v", got, ok, tc.want, tc.ok)
			}
		})
	}
}
