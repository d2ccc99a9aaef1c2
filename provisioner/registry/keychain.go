package registry

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
)

// dockerConfig is the content of a kubernetes.io/dockerconfigjson Secret.
type dockerConfig struct {
	Auths map[string]struct {
		Auth     string `json:"auth"`
		Username string `json:"username"`
		Password string `json:"password"`
	} `json:"auths"`
}

// keychain answers credentials per registry host from a docker config.
type keychain map[string]authn.AuthConfig

func (k keychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	if c, ok := k[r.RegistryStr()]; ok {
		return authn.FromConfig(c), nil
	}
	return authn.Anonymous, nil
}

// ReadKeychain reads a dockerconfigjson file; empty path: anonymous pulls.
// It is read on every pull so that a rotated Secret takes effect at once.
func ReadKeychain(path string) (authn.Keychain, error) {
	if path == "" {
		return keychain{}, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("pullSecretFile: %w", err)
	}
	var cfg dockerConfig
	if err := json.Unmarshal(b, &cfg); err != nil {
		return nil, fmt.Errorf("pullSecretFile %s: not a docker config (.dockerconfigjson): %w", path, err)
	}
	k := keychain{}
	for host, a := range cfg.Auths {
		user, pass := a.Username, a.Password
		if a.Auth != "" {
			raw, err := base64.StdEncoding.DecodeString(a.Auth)
			if err != nil {
				return nil, fmt.Errorf("pullSecretFile %s: auths[%q].auth: not base64", path, host)
			}
			u, p, ok := strings.Cut(string(raw), ":")
			if !ok {
				return nil, fmt.Errorf("pullSecretFile %s: auths[%q].auth: want user:password", path, host)
			}
			user, pass = u, p
		}
		// Keys may be URLs ("https://host/v1/") or bare hosts.
		h := strings.TrimPrefix(strings.TrimPrefix(host, "https://"), "http://")
		h, _, _ = strings.Cut(h, "/")
		k[h] = authn.AuthConfig{Username: user, Password: pass}
	}
	return k, nil
}
