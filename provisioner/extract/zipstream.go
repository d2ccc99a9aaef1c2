package extract

import (
	"archive/zip"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"sort"
	"sync/atomic"

	"github.com/klauspost/compress/flate"
	"github.com/spf13/afero"
	"golang.org/x/sync/errgroup"

	"github.com/oneagent-csi/oneagent-csi/internal/diskio"
	"github.com/oneagent-csi/oneagent-csi/storage"
)

// ZipTailProbe is how many bytes from the end of a ZIP hold its end
// records whatever its comment: the first range to fetch.
const ZipTailProbe = 128 << 10

// ZipTail is the end of a ZIP archive, fetched ahead of the archive (an
// HTTP range request), so that every entry is checked against the central
// directory before the first byte of data arrives.
type ZipTail struct {
	// Data are the archive's bytes from Offset to its end.
	Data []byte
	// Offset is where Data starts in the archive.
	Offset int64
	// Size is the archive's size.
	Size int64
}

// ReadAt reads the archive's bytes that the tail holds.
func (t ZipTail) ReadAt(p []byte, off int64) (int, error) {
	if off < t.Offset {
		return 0, fmt.Errorf("read at %d: the fetched end of the archive starts at %d", off, t.Offset)
	}
	if off >= t.Offset+int64(len(t.Data)) {
		return 0, io.EOF
	}
	n := copy(p, t.Data[off-t.Offset:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// ZipTailStart reads the end records in t (the last ZipTailProbe bytes or
// more) and returns the offset the tail must start at to hold the central
// directory. An archive whose directory exceeds the limits is refused
// here, before its directory is fetched.
func ZipTailStart(t ZipTail, limits Limits) (int64, error) {
	limits.Defaults()
	d, err := readZipDirectory(t, t.Size)
	if err != nil {
		return 0, err
	}
	if err := checkZipDirectory(d, limits); err != nil {
		return 0, err
	}
	if d.offset > uint64(t.Size) || d.size > uint64(t.Size)-d.offset {
		return 0, badArchive("central directory at %d (%d bytes) lies outside the archive of %d bytes", d.offset, d.size, t.Size)
	}
	return int64(d.offset), nil
}

// ErrSource: reading the archive from its source failed (a download that
// broke off, stalled or brought other bytes than before). Not the archive's
// fault: a retry may succeed.
var ErrSource = errors.New("reading the archive failed")

// ErrArchiveChanged: the source served other bytes for the archive than at
// the request that fetched its central directory (wraps ErrSource).
var ErrArchiveChanged = errors.New("the archive changed between its requests")

// sourceError is a failure to read the archive from its source: returned
// as it is (wrapping ErrSource) rather than as ErrBadArchive.
type sourceError struct{ err error }

func (e *sourceError) Error() string   { return e.err.Error() }
func (e *sourceError) Unwrap() []error { return []error{ErrSource, e.err} }

// sourceReader tags the errors of the archive's source and counts its bytes.
type sourceReader struct {
	r   io.Reader
	pos int64
}

func (s *sourceReader) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	s.pos += int64(n)
	if err != nil && err != io.EOF { //nolint:errorlint // io.EOF is returned unwrapped by contract
		err = &sourceError{err}
	}
	return n, err
}

// Entries whose compressed data is at most this size are read whole and
// handed to a worker, so that several small files are extracted at once;
// larger ones are piped to a worker while they arrive.
const streamBufferedMax = 128 << 10

// streamJob is one file for a worker: its compressed bytes, read whole
// (data) or arriving through pipe.
type streamJob struct {
	i    int
	data []byte
	pipe *io.PipeReader
}

// ZipStream extracts the ZIP whose end is tail while it arrives as body
// (the whole archive from its first byte) into destDir (which must not
// exist yet) and returns the manifest entries. Every entry is checked
// against the central directory before anything is written, as Zip does;
// each local header must then match its directory record and lie after
// the previous entry's data, every file is decompressed while it arrives
// and checked against the size and CRC-32 of the directory, and the bytes
// of body where the tail lies must be the tail's. Links are created last,
// once their targets (entry data) have arrived and passed the checks.
//
// Errors reading body are returned wrapped, not as ErrBadArchive: a broken
// download is retried, a bad archive is not. A body that ends early fails
// wrapping io.ErrUnexpectedEOF. On error the caller removes destDir.
func ZipStream(ctx context.Context, fsys afero.Fs, destDir string, tail ZipTail, body io.Reader, opts Options) (Result, error) {
	limits, workers := opts.Limits, opts.Workers
	limits.Defaults()
	if workers <= 0 {
		workers = WorkersFor(8 << 20)
	}
	pageCache := opts.PageCache
	if pageCache <= 0 {
		pageCache = diskio.DefaultPageCache
	}
	var out Result
	plan, dirStart, err := planStream(tail, limits)
	if err != nil {
		return out, err
	}
	entries := make([]storage.ManifestEntry, len(plan))
	files, err := makeDirs(fsys, destDir, plan, entries)
	if err != nil {
		return out, err
	}
	stream := make([]int, len(plan))
	for i := range plan {
		stream[i] = i
	}
	sort.Slice(stream, func(a, b int) bool { return plan[stream[a]].offset < plan[stream[b]].offset })

	var total, done atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	work := make(chan streamJob)
	src := &sourceReader{r: body}
	// One buffer per worker and one being filled, allocated once: no
	// garbage per file, and the memory stays what the workers were sized for.
	buffers := make(chan []byte, workers+1)
	for range workers + 1 {
		buffers <- nil
	}
	rd := &streamReader{br: bufio.NewReaderSize(src, workerReadBuffer), src: src, buffers: buffers,
		size: tail.Size, dirStart: dirStart, dirSum: sha256.Sum256(tail.Data[dirStart-tail.Offset:])}
	g.Go(func() error {
		defer close(work)
		for _, i := range stream {
			if err := rd.entry(gctx, &plan[i], i, work); err != nil {
				return err
			}
		}
		return rd.rest()
	})
	stopProgress := logExtractProgress(ctx, &done, len(files))
	closer := &diskio.CloseQueue{Limit: pageCache}
	for range workers {
		g.Go(func() error {
			x := newFileExtractor(fsys, destDir, &total, limits.MaxBytes, closer, diskio.WriteBehindChunk(pageCache))
			for job := range work {
				var raw io.Reader
				if job.pipe != nil {
					raw = job.pipe
				} else {
					raw = bytes.NewReader(job.data)
				}
				e, err := x.extract(gctx, plan[job.i], raw)
				if job.pipe != nil {
					if err == nil {
						// Let the reader finish the entry: deflate may end
						// before its last bytes.
						_, err = io.Copy(io.Discard, job.pipe)
					}
					if err != nil {
						job.pipe.CloseWithError(err)
					}
				} else {
					buffers <- job.data[:0]
				}
				if err != nil {
					return err
				}
				entries[job.i] = e
				done.Add(1)
			}
			return nil
		})
	}
	err = g.Wait()
	stopProgress()
	closer.Drain()
	if err != nil {
		return out, err
	}
	if err := checkLinks(plan); err != nil {
		return out, err
	}
	if err := makeSymlinks(fsys, destDir, plan, entries); err != nil {
		return out, err
	}
	out.Entries, out.Size, out.Files = entries, total.Load(), len(files)
	return out, nil
}

// CheckZipTail checks every entry of the central directory in tail the way
// ZipStream does before it reads any data, and returns where the directory
// starts: an error wrapping ErrBadArchive is a verdict on the directory
// alone, the same for every archive with these bytes at its end.
func CheckZipTail(tail ZipTail, limits Limits) (int64, error) {
	limits.Defaults()
	_, dirStart, err := planStream(tail, limits)
	return dirStart, err
}

// planStream checks the central directory in tail and returns the plan
// with every entry's local header offset, and where the directory starts.
func planStream(tail ZipTail, limits Limits) ([]plannedEntry, int64, error) {
	dirStart, err := ZipTailStart(tail, limits)
	if err != nil {
		return nil, 0, err
	}
	if dirStart < tail.Offset {
		return nil, 0, fmt.Errorf("the fetched end of the archive starts at %d, after its central directory at %d", tail.Offset, dirStart)
	}
	zr, err := zip.NewReader(tail, tail.Size)
	if err != nil {
		return nil, 0, badArchive("%v", err)
	}
	offsets, err := headerOffsets(tail, dirStart, len(zr.File))
	if err != nil {
		return nil, 0, err
	}
	plan, err := planEntries(zr.File, tail.Size, limits)
	if err != nil {
		return nil, 0, err
	}
	for i := range plan {
		plan[i].offset = offsets[plan[i].order]
		// Drop the directory (and the tail it was read from) during the
		// extraction: the plan holds what it needs.
		plan[i].f = nil
	}
	return plan, dirStart, nil
}

// streamReader walks the archive front to back.
type streamReader struct {
	br      *bufio.Reader
	src     *sourceReader
	buffers chan []byte
	// size is the archive's; dirStart and dirSum where its central
	// directory starts and the SHA-256 of the bytes from there to the end.
	size     int64
	dirStart int64
	dirSum   [sha256.Size]byte
	hdr      [30]byte
	name     []byte
}

// pos is the archive offset of the next byte br returns.
func (r *streamReader) pos() int64 { return r.src.pos - int64(r.br.Buffered()) }

// readErr makes an early end of the archive a source error.
func (r *streamReader) readErr(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return &sourceError{fmt.Errorf("archive ends after %d of %d bytes: %w", r.src.pos, r.size, io.ErrUnexpectedEOF)}
	}
	return err
}

func (r *streamReader) skip(n int64) error {
	if _, err := r.br.Discard(int(n)); err != nil {
		return r.readErr(err)
	}
	return nil
}

// Local file header (APPNOTE 4.3.7).
const localHeaderSignature = 0x04034b50

// entry reads the local header and the data of plan entry p (index i) and
// hands a file's data to a worker.
func (r *streamReader) entry(ctx context.Context, p *plannedEntry, i int, work chan<- streamJob) error {
	pos := r.pos()
	if p.offset < pos {
		return badArchive("entry %s at offset %d overlaps the entry before it (ending at %d)", p.name, p.offset, pos)
	}
	if err := r.skip(p.offset - pos); err != nil {
		return err
	}
	if _, err := io.ReadFull(r.br, r.hdr[:]); err != nil {
		return r.readErr(err)
	}
	if binary.LittleEndian.Uint32(r.hdr[:]) != localHeaderSignature {
		return badArchive("entry %s: no local header at offset %d", p.name, p.offset)
	}
	if m := binary.LittleEndian.Uint16(r.hdr[8:]); m != p.hdr.method {
		return badArchive("entry %s: local header says compression method %d, central directory %d", p.name, m, p.hdr.method)
	}
	nameLen, extraLen := int(binary.LittleEndian.Uint16(r.hdr[26:])), int64(binary.LittleEndian.Uint16(r.hdr[28:]))
	if nameLen != len(p.hdr.rawName) {
		return badArchive("entry %s: local header has another name", p.name)
	}
	r.name = append(r.name[:0], make([]byte, nameLen)...)
	if _, err := io.ReadFull(r.br, r.name); err != nil {
		return r.readErr(err)
	}
	if string(r.name) != p.hdr.rawName {
		return badArchive("entry %s: local header names %s", p.name, shortName(string(r.name)))
	}
	if err := r.skip(extraLen); err != nil {
		return err
	}
	size := int64(p.hdr.csize)
	if end := r.pos() + size; size < 0 || end > r.dirStart {
		return badArchive("entry %s: data of %d bytes runs into the central directory", p.name, p.hdr.csize)
	}
	switch p.kind {
	case "file":
		return r.file(ctx, i, size, work)
	case "symlink":
		return r.link(p, size)
	default:
		return r.skip(size)
	}
}

func (r *streamReader) file(ctx context.Context, i int, size int64, work chan<- streamJob) error {
	if size <= streamBufferedMax {
		var buf []byte
		select {
		case buf = <-r.buffers:
		case <-ctx.Done():
			return ctx.Err()
		}
		if cap(buf) < streamBufferedMax {
			buf = make([]byte, 0, streamBufferedMax)
		}
		buf = buf[:size]
		if _, err := io.ReadFull(r.br, buf); err != nil {
			return r.readErr(err)
		}
		select {
		case work <- streamJob{i: i, data: buf}:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	pr, pw := io.Pipe()
	select {
	case work <- streamJob{i: i, pipe: pr}:
	case <-ctx.Done():
		return ctx.Err()
	}
	n, err := io.CopyN(pw, r.br, size)
	if err == nil {
		return pw.Close()
	}
	var srcErr *sourceError
	if n < size && (errors.As(err, &srcErr) || errors.Is(err, io.EOF)) {
		err = r.readErr(err)
		pw.CloseWithError(err)
	}
	// Otherwise the worker closed the pipe with its own error.
	return err
}

// link reads a link's target, checking its size and CRC-32.
func (r *streamReader) link(p *plannedEntry, size int64) error {
	data := make([]byte, size)
	if _, err := io.ReadFull(r.br, data); err != nil {
		return r.readErr(err)
	}
	var in io.Reader = bytes.NewReader(data)
	if p.hdr.method == zip.Deflate {
		in = flate.NewReader(in)
	}
	crc := crc32.NewIEEE()
	target, err := readLinkTarget(p.name, io.TeeReader(in, crc))
	if err != nil {
		return err
	}
	if uint64(len(target)) != p.hdr.usize || crc.Sum32() != p.hdr.crc {
		return badArchive("symlink %s: target does not match the size and checksum of the central directory", p.name)
	}
	p.link = target
	return nil
}

// rest reads the archive after the last entry: its central directory
// must be the one fetched first, and the archive must end where it said.
func (r *streamReader) rest() error {
	if err := r.skip(r.dirStart - r.pos()); err != nil {
		return err
	}
	h := sha256.New()
	if _, err := io.CopyN(h, r.br, r.size-r.dirStart); err != nil {
		return r.readErr(err)
	}
	if !bytes.Equal(h.Sum(nil), r.dirSum[:]) {
		// Not the archive's fault: the tenant served other bytes than
		// at the first request; a retry fetches both again.
		return &sourceError{fmt.Errorf("%w: its central directory differs from the one fetched first", ErrArchiveChanged)}
	}
	if n, _ := r.br.Read(make([]byte, 1)); n > 0 {
		return &sourceError{fmt.Errorf("%w: it is longer than the %d bytes its first answer declared", ErrArchiveChanged, r.size)}
	}
	return nil
}

// Central directory file header (APPNOTE 4.3.12).
const centralHeaderSignature = 0x02014b50

// headerOffsets returns the local header offset of every central directory
// record in directory order (archive/zip keeps them private). count is how
// many records archive/zip decoded: the two readings must agree.
func headerOffsets(t ZipTail, dirStart int64, count int) ([]int64, error) {
	b := t.Data[dirStart-t.Offset:]
	out := make([]int64, 0, count)
	for len(out) < count {
		if len(b) < centralHeaderLen || binary.LittleEndian.Uint32(b) != centralHeaderSignature {
			return nil, badArchive("central directory record %d is missing or damaged", len(out))
		}
		compressed, uncompressed := binary.LittleEndian.Uint32(b[20:]), binary.LittleEndian.Uint32(b[24:])
		nameLen, extraLen, commentLen := int(binary.LittleEndian.Uint16(b[28:])), int(binary.LittleEndian.Uint16(b[30:])), int(binary.LittleEndian.Uint16(b[32:]))
		off := uint64(binary.LittleEndian.Uint32(b[42:]))
		rec := centralHeaderLen + nameLen + extraLen + commentLen
		if len(b) < rec {
			return nil, badArchive("central directory record %d is truncated", len(out))
		}
		if off == 0xffffffff {
			var ok bool
			if off, ok = zip64Offset(b[centralHeaderLen+nameLen:centralHeaderLen+nameLen+extraLen], uncompressed, compressed); !ok {
				return nil, badArchive("central directory record %d: no zip64 offset", len(out))
			}
		}
		if off > uint64(dirStart) {
			return nil, badArchive("central directory record %d: local header offset %d lies past the directory", len(out), off)
		}
		out = append(out, int64(off))
		b = b[rec:]
	}
	return out, nil
}

// zip64Offset reads the local header offset from a record's zip64 extra
// field (APPNOTE 4.5.3): the 8-byte values present are the sizes whose
// 32-bit fields are saturated, then the offset.
func zip64Offset(extra []byte, uncompressed, compressed uint32) (uint64, bool) {
	for len(extra) >= 4 {
		id, size := binary.LittleEndian.Uint16(extra), int(binary.LittleEndian.Uint16(extra[2:]))
		if len(extra) < 4+size {
			return 0, false
		}
		field := extra[4 : 4+size]
		extra = extra[4+size:]
		if id != 0x0001 {
			continue
		}
		skip := 0
		if uncompressed == 0xffffffff {
			skip += 8
		}
		if compressed == 0xffffffff {
			skip += 8
		}
		if len(field) < skip+8 {
			return 0, false
		}
		return binary.LittleEndian.Uint64(field[skip:]), true
	}
	return 0, false
}
