//go:build race

package integration

// raceSlowdown scales latency bounds: the race detector makes this code
// several times slower, and `make test` runs under it.
const raceSlowdown = 5
