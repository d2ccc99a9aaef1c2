//go:build !race

package integration

// raceSlowdown scales latency bounds (see race_on_test.go).
const raceSlowdown = 1
