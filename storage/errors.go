package storage

import "errors"

var (
	// ErrNotFound is returned by getters when no record exists.
	ErrNotFound = errors.New("not found")
	// ErrIndexCorrupt is returned by OpenIndex when index.db cannot be used.
	ErrIndexCorrupt = errors.New("index corrupt")
)
