package extract

import (
	"encoding/binary"
	"fmt"
	"io"
)

// ZIP end-of-central-directory records (APPNOTE 4.3.14-4.3.16).
const (
	eocdSignature       = 0x06054b50
	eocdLen             = 22
	zip64LocatorSig     = 0x07064b50
	zip64LocatorLen     = 20
	zip64EOCDSignature  = 0x06064b50
	zip64EOCDMinLen     = 56
	maxZipCommentLength = 0xffff
	// centralHeaderLen is the fixed part of a central directory header.
	centralHeaderLen = 46
)

// zipDirectory is what the end-of-central-directory record declares.
type zipDirectory struct {
	entries uint64
	size    uint64 // bytes of the central directory
	offset  uint64 // where the central directory starts
}

// readZipDirectory reads the end-of-central-directory record (and its ZIP64
// form) without touching the central directory itself, so that an archive
// declaring more entries than allowed is refused before their headers are
// decoded into memory.
func readZipDirectory(r io.ReaderAt, size int64) (zipDirectory, error) {
	var d zipDirectory
	n := min(size, eocdLen+maxZipCommentLength)
	if n < eocdLen {
		return d, badArchive("%d bytes is too short for a ZIP archive", size)
	}
	buf := make([]byte, n)
	if _, err := r.ReadAt(buf, size-n); err != nil && err != io.EOF {
		return d, fmt.Errorf("read end of archive: %w", err)
	}
	at := -1
	for i := len(buf) - eocdLen; i >= 0; i-- {
		if binary.LittleEndian.Uint32(buf[i:]) == eocdSignature {
			at = i
			break
		}
	}
	if at < 0 {
		return d, badArchive("no end-of-central-directory record (not a ZIP archive, or truncated)")
	}
	rec := buf[at:]
	d.entries = uint64(binary.LittleEndian.Uint16(rec[10:]))
	d.size = uint64(binary.LittleEndian.Uint32(rec[12:]))
	d.offset = uint64(binary.LittleEndian.Uint32(rec[16:]))
	if d.entries != 0xffff && d.size != 0xffffffff && d.offset != 0xffffffff {
		return d, nil
	}
	// ZIP64: the locator sits right before the record.
	locAt := size - n + int64(at) - zip64LocatorLen
	if locAt < 0 {
		return d, nil
	}
	loc := make([]byte, zip64LocatorLen)
	if _, err := r.ReadAt(loc, locAt); err != nil {
		return d, fmt.Errorf("read zip64 locator: %w", err)
	}
	if binary.LittleEndian.Uint32(loc) != zip64LocatorSig {
		return d, nil
	}
	off := int64(binary.LittleEndian.Uint64(loc[8:]))
	if off < 0 || off > size-zip64EOCDMinLen {
		return d, badArchive("zip64 end record offset %d lies outside the archive", off)
	}
	rec64 := make([]byte, zip64EOCDMinLen)
	if _, err := r.ReadAt(rec64, off); err != nil {
		return d, fmt.Errorf("read zip64 end record: %w", err)
	}
	if binary.LittleEndian.Uint32(rec64) != zip64EOCDSignature {
		return d, badArchive("zip64 end record has a wrong signature")
	}
	d.entries = binary.LittleEndian.Uint64(rec64[32:])
	d.size = binary.LittleEndian.Uint64(rec64[40:])
	d.offset = binary.LittleEndian.Uint64(rec64[48:])
	return d, nil
}

// checkZipDirectory refuses an archive whose declared directory is larger
// than the limits allow.
func checkZipDirectory(d zipDirectory, limits Limits) error {
	if d.entries > uint64(limits.MaxEntries) {
		return badArchive("%d entries exceed the limit of %d", d.entries, limits.MaxEntries)
	}
	// Every header is 46 bytes plus its name, extra field and comment.
	if maxSize := uint64(limits.MaxEntries) * (centralHeaderLen + maxNameLength + 2*maxZipCommentLength); d.size > maxSize {
		return badArchive("central directory of %d bytes exceeds what %d entries may take", d.size, limits.MaxEntries)
	}
	if d.size > uint64(limits.MaxDirectoryBytes) {
		return badArchive("central directory of %d bytes is over the %d bytes it may hold in memory (half of extractMemory)", d.size, limits.MaxDirectoryBytes)
	}
	return nil
}
