package main

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/spf13/pflag"

	"github.com/cubicle-dev/cubicle/api"
)

// apiFlags are serve's flags for the API's browser and client policy.
func apiFlags(f *pflag.FlagSet, c *serveConfig) {
	f.StringVar(&c.corsOrigins, "cors-origins", envOr("CUBICLE_CORS_ORIGINS", strings.Join(api.DefaultCORSOrigins, ",")),
		"browser origins allowed to call the API, comma-separated scheme://host[:port], or * for any (env CUBICLE_CORS_ORIGINS)")
	f.StringVar(&c.trustedProxies, "trusted-proxies", envOr("CUBICLE_TRUSTED_PROXIES", ""),
		"CIDRs of reverse proxies whose X-Forwarded-For names the client, comma-separated; none by default (env CUBICLE_TRUSTED_PROXIES)")
}

// apiOptions checks the API flags, before serve does anything.
func (c serveConfig) apiOptions() (origins []string, trusted []netip.Prefix, err error) {
	if origins, err = api.ParseCORSOrigins(strings.Split(c.corsOrigins, ",")); err != nil {
		return nil, nil, fmt.Errorf("--cors-origins: %w", err)
	}
	if origins == nil {
		origins = []string{} // none: no browser may call the API
	}
	for _, s := range strings.Split(c.trustedProxies, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		p, err := netip.ParsePrefix(s)
		if err != nil {
			a, aerr := netip.ParseAddr(s)
			if aerr != nil {
				return nil, nil, fmt.Errorf("--trusted-proxies: %q is not a CIDR or an address", s)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		trusted = append(trusted, p.Masked())
	}
	return origins, trusted, nil
}
