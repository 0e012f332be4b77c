package main

import (
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/cubicle-dev/cubicle/store"
)

func dataDirFlag(fs *pflag.FlagSet, p *string) {
	fs.StringVar(p, "data-dir", envOr("CUBICLE_DATA_DIR", "/var/lib/cubicle"), "state directory (env CUBICLE_DATA_DIR)")
}

func keysCmd() *cobra.Command {
	var dataDir string
	cmd := &cobra.Command{Use: "keys", Short: "Manage API keys (works on the local data directory)"}
	dataDirFlag(cmd.PersistentFlags(), &dataDir)

	var name string
	create := &cobra.Command{
		Use:   "create",
		Short: "Create an API key and print it (it is shown only once)",
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := openStore(dataDir)
			if err != nil {
				return err
			}
			defer st.Close()
			k, secret, err := st.CreateAPIKey(cmd.Context(), name)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "created key %s (%s)\n", k.ID, k.Name)
			fmt.Fprintln(cmd.OutOrStdout(), secret)
			return nil
		},
	}
	create.Flags().StringVar(&name, "name", "cli", "a name to remember the key by")

	list := &cobra.Command{
		Use:   "list",
		Short: "List API keys",
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := openStore(dataDir)
			if err != nil {
				return err
			}
			defer st.Close()
			keys, err := st.ListAPIKeys(cmd.Context())
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tNAME\tKEY\tCREATED\tSTATE")
			for _, k := range keys {
				state := "active"
				if k.RevokedAt != nil {
					state = "revoked " + k.RevokedAt.Format("2006-01-02 15:04")
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", k.ID, k.Name, k.Mask, k.CreatedAt.Format("2006-01-02 15:04"), state)
			}
			return tw.Flush()
		},
	}
	revoke := &cobra.Command{
		Use:   "revoke ID",
		Short: "Revoke an API key",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := openStore(dataDir)
			if err != nil {
				return err
			}
			defer st.Close()
			return st.RevokeAPIKey(cmd.Context(), args[0])
		},
	}
	cmd.AddCommand(create, list, revoke)
	return cmd
}

func openStore(dataDir string) (*store.Store, error) {
	if err := ensureDir(dataDir); err != nil {
		return nil, err
	}
	return store.Open(dataDir)
}
